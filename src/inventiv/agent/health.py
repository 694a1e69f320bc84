"""The agent's small HTTP server: liveness, readiness, Prometheus metrics, and the one signed
control endpoint through which the control plane pushes a new URL to a running agent."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from pydantic import ValidationError

from inventiv.config import MAX_BODY_BYTES, ControlPlaneURLError
from inventiv.protocol import (
    CONTROL_URL_PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    ControlUrlUpdate,
    verify_control_request,
)

from .state import AgentState
from .urls import describe_url_error

log = logging.getLogger("inventiv.agent")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def render_metrics(state: AgentState, now: float | None = None) -> str:
    """Prometheus text exposition of the agent's own state (the engine exports its own)."""
    now = time.monotonic() if now is None else now
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float | None) -> None:
        if value is None:
            return
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name} {value}")

    metric("inventiv_agent_up", "gauge", "The agent process is running.", 1)
    metric(
        "inventiv_agent_registered",
        "gauge",
        "Registered with the control plane.",
        int(state.registered),
    )
    metric(
        "inventiv_agent_ready",
        "gauge",
        "Engine ready and registered (as /readyz).",
        int(state.ready),
    )
    metric(
        "inventiv_agent_engine_ready",
        "gauge",
        "The engine lists the model.",
        int(state.engine_ready),
    )
    metric(
        "inventiv_agent_engine_restarts_total",
        "counter",
        "Engine restarts after a crash.",
        state.engine_restarts,
    )
    metric(
        "inventiv_agent_heartbeats_total", "counter", "Heartbeats accepted.", state.heartbeats_ok
    )
    metric(
        "inventiv_agent_heartbeat_failures_total",
        "counter",
        "Heartbeats that failed.",
        state.heartbeat_failures,
    )
    metric(
        "inventiv_agent_register_failures_total",
        "counter",
        "Registrations that failed.",
        state.register_failures,
    )
    metric(
        "inventiv_agent_registrations_total",
        "counter",
        "Successful registrations.",
        state.registrations,
    )
    metric(
        "inventiv_agent_control_plane_url_changes_total",
        "counter",
        "Control-plane URL changes adopted.",
        state.url_changes,
    )
    if state.last_heartbeat_ok_at is not None:
        metric(
            "inventiv_agent_last_heartbeat_age_seconds",
            "gauge",
            "Seconds since the last accepted heartbeat.",
            round(now - state.last_heartbeat_ok_at, 3),
        )
    unreachable = 0.0 if state.unreachable_since is None else now - state.unreachable_since
    metric(
        "inventiv_agent_control_plane_unreachable_seconds",
        "gauge",
        "Seconds the control plane has been unreachable (0 when reachable).",
        round(unreachable, 3),
    )
    metric(
        "inventiv_agent_engine_queue_depth",
        "gauge",
        "Requests waiting in the engine.",
        state.queue_depth,
    )
    metric(
        "inventiv_agent_engine_requests_running",
        "gauge",
        "Requests running in the engine.",
        state.requests_running,
    )
    metric(
        "inventiv_agent_uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
        round(now - state.started_at, 3),
    )
    lines.append("# HELP inventiv_agent_status The status reported in heartbeats.")
    lines.append("# TYPE inventiv_agent_status gauge")
    lines.append(f'inventiv_agent_status{{status="{state.status.value}"}} 1')
    return "\n".join(lines) + "\n"


class HealthApp:
    """A bare ASGI app: four routes do not need a framework, and fewer moving parts start faster
    and fail less on a GPU VM."""

    def __init__(
        self,
        state: AgentState,
        *,
        token_hash: Callable[[], str | None],
        adopt_url: Callable[[str], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self._token_hash = token_hash
        self._adopt_url = adopt_url
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/healthz" and method in ("GET", "HEAD"):
            await _json(send, 200, {"status": "ok"})
        elif path == "/readyz" and method in ("GET", "HEAD"):
            body = {
                "ready": self.state.ready,
                "registered": self.state.registered,
                "engine_ready": self.state.engine_ready,
                "status": self.state.status.value,
            }
            await _json(send, 200 if self.state.ready else 503, body)
        elif path == "/metrics" and method == "GET":
            await _send(
                send,
                200,
                render_metrics(self.state).encode(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        elif path == CONTROL_URL_PATH and method == "POST":
            await self._control_url(scope, receive, send)
        elif path in ("/healthz", "/readyz", "/metrics", CONTROL_URL_PATH):
            await _error(send, 405, "method_not_allowed", f"{method} is not allowed on {path}.")
        else:
            await _error(send, 404, "not_found", f"No route {path}.")

    async def _control_url(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            await _error(
                send, 413, "body_too_large", f"Bodies are limited to {MAX_BODY_BYTES} bytes."
            )
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        timestamp = headers.get(TIMESTAMP_HEADER)
        signature = headers.get(SIGNATURE_HEADER)
        token_hash = self._token_hash()
        if not timestamp or not signature:
            await _error(
                send,
                401,
                "missing_signature",
                f"Sign the request: {TIMESTAMP_HEADER} and {SIGNATURE_HEADER} are required.",
            )
            return
        if token_hash is None or not verify_control_request(
            token_hash, timestamp, body, signature, self._clock()
        ):
            log.warning("control: refused a /control/url request with a bad signature")
            await _error(
                send,
                401,
                "invalid_signature",
                "The signature does not match this worker's token, or the timestamp is more "
                "than 5 minutes off.",
            )
            return
        try:
            update = ControlUrlUpdate.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            await _error(send, 422, "invalid_field", f"{where}: {first.get('msg', 'invalid')}.")
            return
        try:
            changed = self._adopt_url(update.control_plane_url)
        except ControlPlaneURLError as exc:
            await _error(send, 422, "invalid_url", describe_url_error(exc) + ".")
            return
        await _json(send, 200, {"control_plane_url": update.control_plane_url, "changed": changed})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when it exceeds MAX_BODY_BYTES."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    await _send(send, status, json.dumps(payload).encode(), "application/json")


async def _error(send: Send, status: int, code: str, message: str) -> None:
    await _json(send, status, {"error": code, "message": message})


class _NoSignalServer(uvicorn.Server):
    """uvicorn inside the agent's loop: the agent owns SIGTERM/SIGINT, not the web server."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


class HealthServer:
    """Binds the socket itself, so a busy port fails at start with a clear message."""

    def __init__(self, app: HealthApp, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: _NoSignalServer | None = None
        self._sock: socket.socket | None = None

    def bind(self) -> int:
        """Bind now and return the actual port (WORKER_HEALTH_PORT=0 picks a free one)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        return self.port

    async def serve(self) -> None:
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            access_log=False,
            log_config=None,
            log_level="warning",
            server_header=False,
            timeout_keep_alive=5,
        )
        self._server = _NoSignalServer(config)
        await self._server.serve(sockets=[self._sock])

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
