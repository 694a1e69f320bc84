"""Put the cloudflared stand-in on PATH and drive the tunnel commands against it.

The stand-in becomes an executable named `cloudflared` whose shebang is the interpreter running
the tests (an absolute path that exists only on this machine, so it is generated, never
committed).
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import free_port

SOURCE = Path(__file__).with_name("fake_cloudflared.py")
CLI = [sys.executable, "-m", "inventiv.cli"]


def install_fake(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / "cloudflared"
    target.write_text(f"#!{sys.executable}\n" + SOURCE.read_text(encoding="utf-8"))
    target.chmod(0o755)
    return target


@dataclass
class FakeEnv:
    """Paths and environment for one test's stand-in and tunnel commands."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def cert(self) -> Path:
        return self.root / "fake-cloudflared.pem"

    @property
    def events_file(self) -> Path:
        return self.root / "fake-cloudflared-events.jsonl"

    @property
    def env_file(self) -> Path:
        return Path(self.env["INVENTIV_ENV_FILE"])

    def events(self) -> list[dict[str, Any]]:
        if not self.events_file.exists():
            return []
        lines = self.events_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def make_env(
    root: Path,
    settings_env: dict[str, str],
    *,
    with_fake: bool = True,
    **extra: str,
) -> FakeEnv:
    """Environment with the stand-in first on PATH (or, with_fake=False, no cloudflared at all)."""
    fake = FakeEnv(root)
    bin_dir = root / "bin"
    base_path = os.environ.get("PATH", "")
    if with_fake:
        install_fake(bin_dir)
        path = f"{bin_dir}{os.pathsep}{base_path}"
    else:
        # Only the interpreter's directory: a real cloudflared elsewhere on PATH must not count.
        path = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": path,
        "FAKE_CLOUDFLARED_CERT": str(fake.cert),
        "FAKE_CLOUDFLARED_EVENTS": str(fake.events_file),
        "SSL_CERT_FILE": str(fake.cert),
        "INVENTIV_ENV_FILE": str(root / "dev.env"),
        "INVENTIV_DATA_DIR": str(root / "data"),
        "NO_COLOR": "1",
        "COLUMNS": "200",
        **settings_env,
        **extra,
    }
    env.pop("WORKER_CONTROL_PLANE_URL", None)
    fake.env = env
    return fake


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read_env_file(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


class Running:
    """A background CLI process whose combined output is collected as it arrives."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self._chunks: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._chunks.append(line)

    @property
    def output(self) -> str:
        return "".join(self._chunks)

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode


def start_fake_cloudflared(fake: FakeEnv, origin_port: int) -> tuple[subprocess.Popen[str], str]:
    """Run the stand-in directly (as an operator would run cloudflared by hand); its URL."""
    before = len(fake.events())
    proc = subprocess.Popen(
        ["cloudflared", "tunnel", "--url", f"http://127.0.0.1:{origin_port}"],
        env=fake.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    events = wait_for(lambda: fake.events()[before:], what="the stand-in to start")
    return proc, events[0]["url"]


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- a minimal control plane, for tests that only need its HTTP contract --------------------


@dataclass
class FakeAPIState:
    token: str
    orchestrator: str = "ok"
    control_url: str | None = None
    puts: list[dict[str, Any]] = field(default_factory=list)


class FakeAPI:
    """Answers like the API on the calls the tunnel commands make: GET /, PUT/GET
    /api/control-plane-url (admin token), GET /internal/worker/ping, GET /v1/models."""

    def __init__(self, port: int, token: str) -> None:
        self.state = FakeAPIState(token)
        state = self.state

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                return self.headers.get("Authorization") == f"Bearer {state.token}"

            def do_GET(self) -> None:
                if self.path == "/":
                    self._json(
                        200,
                        {
                            "service": "inventiv-api",
                            "version": "test",
                            "orchestrator": state.orchestrator,
                        },
                    )
                elif self.path == "/internal/worker/ping":
                    if state.orchestrator == "ok":
                        self._json(200, {"ok": True, "service": "inventiv-orchestrator"})
                    else:
                        self._json(503, {"error": "orchestrator_unreachable", "message": "down"})
                elif self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": []})
                elif self.path == "/api/control-plane-url" and self._authorized():
                    self._json(200, {"url": state.control_url, "source": "runtime"})
                else:
                    self._json(404 if self._authorized() else 401, {"error": "nope"})

            def do_PUT(self) -> None:
                if self.path != "/api/control-plane-url":
                    self._json(404, {"error": "not_found"})
                    return
                if not self._authorized():
                    self._json(401, {"error": "unauthorized", "message": "bad token"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                state.puts.append(body)
                state.control_url = body.get("url")
                self._json(200, {"url": state.control_url, "source": "runtime", "pushed_to": 0})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def env(self) -> dict[str, str]:
        """Settings that point the tunnel commands at this stand-in API."""
        return {
            "API_HOST_PORT": str(self.server.server_address[1]),
            "INVENTIV_ADMIN_TOKEN": self.state.token,
        }

    def __enter__(self) -> FakeAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(name="api")
def fake_api_fixture() -> Iterator[FakeAPI]:
    """A running stand-in API; test modules import this to get the `api` fixture."""
    with FakeAPI(free_port(), "tok-" + uuid.uuid4().hex) as server:
        yield server
