"""The orchestrator process: the worker protocol on FastLane routes (the hot path), the admin
routes on FastAPI, and the background jobs, all sharing one database engine.

Listens on 127.0.0.1 only; the API is its one client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError

from inventiv import __version__
from inventiv.api.admin import router as admin_router
from inventiv.api.errors import describe_validation_errors, install_error_handlers
from inventiv.config import Settings
from inventiv.db.engine import create_engine, create_session_factory
from inventiv.db.migrate import upgrade_database
from inventiv.errors import HTTPError
from inventiv.fastlane import Handler, Request, Response, json_response
from inventiv.orchestrator.control_url import ControlPlaneURL
from inventiv.orchestrator.instances import InstanceService
from inventiv.orchestrator.jobs import Jobs
from inventiv.orchestrator.workers import WorkerProtocol
from inventiv.protocol import (
    HEARTBEAT_PATH,
    PING_PATH,
    PROTOCOL_VERSION,
    REGISTER_PATH,
    WORKER_PATH_PREFIX,
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


def require_bearer(request: Request) -> str:
    token = request.bearer_token()
    if token is None:
        raise HTTPError(
            401,
            "missing_token",
            "Worker calls need `Authorization: Bearer <token>`: the instance's bootstrap token "
            "for the first register, then the worker token it returns.",
            [(b"www-authenticate", b"Bearer")],
        )
    return token


def client_address(request: Request) -> str | None:
    forwarded = request.header(b"x-forwarded-for")
    if forwarded:
        return forwarded.decode("latin-1").split(",")[-1].strip() or None
    return request.client


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
    """The worker protocol on FastLane; everything else (admin, health) on FastAPI."""

    def __init__(self, settings: Settings) -> None:
        self._workers: WorkerProtocol | None = None
        self.fastapi = build_fastapi(settings, self._started)
        self._routes: dict[tuple[bytes, bytes], Handler] = {
            (b"POST", HEARTBEAT_PATH.encode()): self._heartbeat,
            (b"POST", REGISTER_PATH.encode()): self._register,
            (b"GET", PING_PATH.encode()): self._ping,
        }
        self._worker_prefix = WORKER_PATH_PREFIX.encode()
        self._ping_body = json.dumps(
            {"ok": True, "service": "inventiv-orchestrator", "protocol_version": PROTOCOL_VERSION}
        ).encode()

    def route(self, method: bytes, path: bytes) -> Handler | None:
        handler = self._routes.get((method, path))
        if handler is None and path.startswith(self._worker_prefix):
            # Answered here too, so a stray worker path never hands a pooled connection of the
            # API's over to the slower ASGI path.
            return self._no_such_worker_route
        return handler

    async def _no_such_worker_route(self, request: Request) -> Response:
        if any(path == request.path for _, path in self._routes):
            raise HTTPError(
                405,
                "method_not_allowed",
                f"{request.method.decode()} is not allowed on {request.path.decode()}; see "
                "docs/worker-protocol.md.",
            )
        raise HTTPError(
            404,
            "not_found",
            f"No worker route {request.path.decode()}; see docs/worker-protocol.md.",
        )

    def _started(self, workers: WorkerProtocol) -> None:
        self._workers = workers

    @property
    def workers(self) -> WorkerProtocol:
        if self._workers is None:
            raise HTTPError(503, "starting", "The orchestrator is starting; retry in a moment.")
        return self._workers

    async def _heartbeat(self, request: Request) -> Response:
        token = require_bearer(request)
        message = parse_message(HeartbeatRequest, request.body)
        return json_response(200, await self.workers.heartbeat(token, message))

    async def _register(self, request: Request) -> Response:
        token = require_bearer(request)
        message = parse_message(RegisterRequest, request.body)
        payload = await self.workers.register(token, message, client_address(request))
        return json_response(200, payload)

    async def _ping(self, request: Request) -> Response:
        return json_response(200, self._ping_body)


def create_app(settings: Settings | None = None) -> OrchestratorApp:
    from inventiv.config import load_settings

    return OrchestratorApp(settings or load_settings())
