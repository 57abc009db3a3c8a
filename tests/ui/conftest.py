"""Fixtures for the web UI tests: `triage serve` over TCP (and a socket) on
copies of the shipped examples, and Debian's Chromium driven by Playwright.

Environment: TRIAGE_BIN (the triage binary), TRIAGE_CHROMIUM (the browser,
default /usr/bin/chromium), TRIAGE_UI_ARTIFACTS (where screenshots go),
plus what `triage serve` needs to load the default specialists
(TRIAGE_MINILM_DIR or its hub mirror, HF_HUB_OFFLINE=1).
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
ADMIN_KEY = "adm-" + secrets.token_hex(12)
USER_KEY = "usr-" + secrets.token_hex(12)


def artifacts() -> Path:
    d = Path(os.environ.get("TRIAGE_UI_ARTIFACTS", ROOT / "target" / "ui-screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def names_in(config: Path) -> set[str]:
    """Every task, tier, stage and route name of a config file."""
    doc = tomllib.loads(config.read_text())
    names = set()
    for task, t in doc.get("tasks", {}).items():
        names.add(task)
        names.update(tier["name"] for tier in t.get("tiers", []))
        names.update(stage["name"] for stage in t.get("stages", []))
        names.update(t.get("routes", {}).keys())
    return names


class Server:
    def __init__(self, tmp: Path, example: str, extra: str = ""):
        self.dir = tmp / example.replace(".toml", "")
        self.dir.mkdir()
        for f in ("prices.toml", example):
            shutil.copy(EXAMPLES / f, self.dir / f)
        self.config = self.dir / example
        if extra:
            with self.config.open("a") as f:
                f.write(extra)
        self.original = self.config.read_text()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        env.update(
            TRIAGE_API_KEYS=f"admin:{ADMIN_KEY},user:{USER_KEY}",
            TRIAGE_ADMIN_KEYS="admin",
            TRIAGE_DATA_DIR=str(self.dir / "data"),
            HF_HUB_OFFLINE="1",
            RUST_LOG=env.get("RUST_LOG", "warn"),
        )
        self.log = (self.dir / "serve.log").open("w")
        binary = os.environ.get("TRIAGE_BIN", str(ROOT / "target" / "debug" / "triage"))
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", str(self.config), "--socket", str(self.dir / "t.sock"),
             "--listen", f"127.0.0.1:{self.port}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + float(os.environ.get("TRIAGE_READY_TIMEOUT_S", "180"))
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"triage serve exited: {(self.dir / 'serve.log').read_text()}")
            try:
                with urllib.request.urlopen(self.base + "/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                raise RuntimeError("triage serve did not become ready")
            time.sleep(0.3)

    def call(self, method: str, path: str, body=None, key: str | None = ADMIN_KEY):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if key:
            req.add_header("authorization", f"Bearer {key}")
        if data is not None:
            req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                return r.status, dict(r.headers), raw
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def browser():
    exe = os.environ.get("TRIAGE_CHROMIUM", "/usr/bin/chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield pg
    ctx.close()
    # A policy violation or a script error is a failure even when the page looked right.
    real = [e for e in errors if "401" not in e and "403" not in e and "409" not in e and "422" not in e]
    assert not real, real


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    started = {}

    def get(example: str, editable: bool = False, extra: str = "", name: str = "") -> Server:
        """A server on a copy of `example` (with `extra` TOML appended; give
        such a server its own `name`), started once per session."""
        k = (example, editable, extra)
        if k not in started:
            if editable:
                extra = "\n[server.ui]\nedit = true\n" + extra
            d = tmp / (name or ("edit" if editable else "ro"))
            d.mkdir(exist_ok=True)
            started[k] = Server(d, example, extra)
        return started[k]

    yield get
    for s in started.values():
        s.stop()
