"""The servers scripts/test-sdk starts, as its environment names them (for conftest.py's
fixtures and the tests' annotations)."""

import os
from dataclasses import dataclass

import pytest


def required(names: list[str]) -> dict[str, str]:
    """The variables `names`; the test fails, saying so, when one is missing."""
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        pytest.fail(f"run through scripts/test-sdk (missing {', '.join(missing)})", pytrace=False)
    return {n: os.environ[n] for n in names}


@dataclass(frozen=True)
class Server:
    """`triage serve` in its default mode (moderation, transcription)."""

    base_url: str
    key: str
    socket: str
    clip: str
    flag_threshold: float

    @staticmethod
    def from_env() -> "Server":
        env = required(
            [
                "TRIAGE_SDK_BASE_URL",
                "TRIAGE_SDK_KEY",
                "TRIAGE_SDK_SOCKET",
                "TRIAGE_SDK_CLIP",
                "TRIAGE_SDK_FLAG_THRESHOLD",
            ]
        )
        return Server(
            base_url=env["TRIAGE_SDK_BASE_URL"],
            key=env["TRIAGE_SDK_KEY"],
            socket=env["TRIAGE_SDK_SOCKET"],
            clip=env["TRIAGE_SDK_CLIP"],
            flag_threshold=float(env["TRIAGE_SDK_FLAG_THRESHOLD"]),
        )


@dataclass(frozen=True)
class ChatServer:
    """`triage serve --config tests/sdk/chat.toml` on llama-server; skipped without it."""

    base_url: str
    key: str
    socket: str

    @staticmethod
    def from_env() -> "ChatServer":
        if os.environ.get("TRIAGE_SDK_SKIP_CHAT") == "1":
            pytest.skip("no llama-server (TRIAGE_SKIP_LLAMA=1)")
        env = required(["TRIAGE_SDK_CHAT_BASE_URL", "TRIAGE_SDK_CHAT_KEY", "TRIAGE_SDK_CHAT_SOCKET"])
        return ChatServer(
            base_url=env["TRIAGE_SDK_CHAT_BASE_URL"],
            key=env["TRIAGE_SDK_CHAT_KEY"],
            socket=env["TRIAGE_SDK_CHAT_SOCKET"],
        )
