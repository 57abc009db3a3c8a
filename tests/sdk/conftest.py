"""Fixtures shared by the SDK tests and the conformance test: the servers scripts/test-sdk
started (servers.py)."""

import pytest

from servers import ChatServer, Server


@pytest.fixture(scope="session")
def server() -> Server:
    return Server.from_env()


@pytest.fixture(scope="session")
def chat_server() -> ChatServer:
    return ChatServer.from_env()
