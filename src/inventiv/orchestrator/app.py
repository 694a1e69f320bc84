"""The orchestrator process: the worker protocol on lean ASGI routes (the hot path), the admin
routes on FastAPI, and the background jobs, all sharing one database engine.

Listens on 127.0.0.1 only; the API is its one client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError

from inventiv import __version__
from inventiv.api.admin import router as admin_router
from inventiv.api.errors import describe_validation_errors, install_error_handlers
from inventiv.asgi import (
    HTTPError,
    Receive,
    Scope,
    Send,
    bearer_token,
    header_value,
    read_body,
    send_error,
    send_json,
    send_response,
)
from inventiv.config import Settings
from inventiv.db.engine import create_engine, create_session_factory
from inventiv.db.migrate import upgrade_database
from inventiv.orchestrator.control_url import ControlPlaneURL
from inventiv.orchestrator.instances import InstanceService
from inventiv.orchestrator.jobs import Jobs
from inventiv.orchestrator.workers import WorkerProtocol
from inventiv.protocol import (
    HEARTBEAT_PATH,
    PING_PATH,
    PROTOCOL_VERSION,
    REGISTER_PATH,
    HeartbeatRequest,
    RegisterRequest,
)
from inventiv.providers import build_providers

log = logging.getLogger("inventiv.orchestrator")


M = TypeVar("M", bound=BaseModel)


def parse_message(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        status, code, message = describe_validation_errors(list(exc.errors()))  # type: ignore[arg-type]
        raise HTTPError(status, code, message) from None


def require_bearer(scope: Scope) -> str:
    token = bearer_token(scope)
    if token is None:
        raise HTTPError(
            401,
            "missing_token",
            "Worker calls need `Authorization: Bearer <token>`: the instance's bootstrap token "
            "for the first register, then the worker token it returns.",
            [(b"www-authenticate", b"Bearer")],
        )
    return token


def client_address(scope: Scope) -> str | None:
    forwarded = header_value(scope, b"x-forwarded-for")
    if forwarded:
        return forwarded.decode("latin-1").split(",")[-1].strip() or None
    client = scope.get("client")
    return client[0] if client else None


def build_fastapi(settings: Settings, started: Callable[[WorkerProtocol], None]) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.effective_database_url)
        await upgrade_database(engine)
        sessions = create_session_factory(engine)
        stack_id = settings.effective_stack_id
        providers = build_providers(settings)
        control_url = ControlPlaneURL(settings, sessions)
        await control_url.refresh()
        wake = asyncio.Event()
        workers = WorkerProtocol(settings, sessions, control_url)
        instances = InstanceService(
            settings, sessions, stack_id, control_url, wake, set(providers), workers.forget_instance
        )
        jobs = Jobs(
            settings,
            sessions,
            providers,
            workers,
            stack_id,
            lambda: instances.worker_url()[0],
            wake,
        )
        app.state.admin_token = settings.resolve_admin_token()[0]
        started(workers)
        app.state.instances = instances
        app.state.control_url = control_url
        background = [
            asyncio.create_task(workers.batcher.run(), name="heartbeat-flush"),
            asyncio.create_task(workers.cache.run(), name="worker-cache"),
            asyncio.create_task(control_url.run_refresher(), name="url-refresh"),
        ]
        jobs.start()
        log.info("orchestrator ready on %s (stack %s)", settings.orchestrator_url, stack_id)
        try:
            yield
        finally:
            await jobs.stop()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await workers.batcher.flush()
            for provider in providers.values():
                await provider.close()
            await engine.dispose()

    app = FastAPI(
        title="Inventiv orchestrator",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.include_router(admin_router)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "service": "inventiv-orchestrator", "version": __version__}

    return app


class OrchestratorApp:
    """Serves the worker protocol without FastAPI's per-request cost; all else goes to FastAPI."""

    def __init__(self, settings: Settings) -> None:
        self._workers: WorkerProtocol | None = None
        self.fastapi = build_fastapi(settings, self._started)
        self._routes: dict[tuple[str, str], Callable[[Scope, Receive, Send], Awaitable[None]]] = {
            ("POST", HEARTBEAT_PATH): self._heartbeat,
            ("POST", REGISTER_PATH): self._register,
            ("GET", PING_PATH): self._ping,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self._routes.get((scope["method"], scope["path"]))
            if handler is not None:
                try:
                    await handler(scope, receive, send)
                except HTTPError as exc:
                    await send_error(send, exc)
                return
        await self.fastapi(scope, receive, send)

    def _started(self, workers: WorkerProtocol) -> None:
        self._workers = workers

    @property
    def workers(self) -> WorkerProtocol:
        if self._workers is None:
            raise HTTPError(503, "starting", "The orchestrator is starting; retry in a moment.")
        return self._workers

    async def _heartbeat(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = require_bearer(scope)
        body = await read_body(scope, receive)
        message = parse_message(HeartbeatRequest, body)
        await send_response(send, 200, await self.workers.heartbeat(token, message))

    async def _register(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = require_bearer(scope)
        body = await read_body(scope, receive)
        message = parse_message(RegisterRequest, body)
        payload = await self.workers.register(token, message, client_address(scope))
        await send_response(send, 200, payload)

    async def _ping(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(
            send,
            200,
            {"ok": True, "service": "inventiv-orchestrator", "protocol_version": PROTOCOL_VERSION},
        )


def create_app(settings: Settings | None = None) -> OrchestratorApp:
    from inventiv.config import load_settings

    return OrchestratorApp(settings or load_settings())
