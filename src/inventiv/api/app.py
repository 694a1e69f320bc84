"""The API process, the public edge: forwards the worker protocol and the admin API to the
orchestrator over keep-alive connections (on FastLane), answers the seed's local check `GET /`,
and publishes the OpenAPI document at /docs (on FastAPI).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from inventiv import __version__
from inventiv.api.admin import router as admin_router
from inventiv.api.errors import install_error_handlers
from inventiv.api.openapi import add_worker_protocol
from inventiv.api.upstream import UpstreamPool, UpstreamTimeout, UpstreamUnavailable
from inventiv.config import Settings
from inventiv.errors import HTTPError
from inventiv.fastlane import Handler, RawHeaders, Request, Response
from inventiv.protocol import REQUEST_ID_HEADER, WORKER_PATH_PREFIX
from inventiv.schemas import ApiStatus

# Never forwarded: hop-by-hop, recomputed, or set by the API itself.
_DROP_REQUEST = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"content-length",
        b"transfer-encoding",
        b"te",
        b"expect",  # the API has read the whole body; the orchestrator must not ask for it
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-connection",
        b"x-forwarded-for",
        b"x-real-ip",
        b"forwarded",
        REQUEST_ID_HEADER.encode(),
    }
)
_DROP_RESPONSE = frozenset(
    {b"connection", b"keep-alive", b"content-length", b"transfer-encoding", b"date", b"server"}
)
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._-]{1,128}$")
ORCHESTRATOR_RETRY_AFTER_S = 2
HEALTH_TIMEOUT_S = 1.0


class ApiApp:
    """Forwards `/internal/worker/*` and `/api/*` on FastLane; FastAPI serves everything else.

    Worker calls and admin calls use separate connection pools, so an admin request never
    hands a worker connection of the orchestrator's over to its slower ASGI path.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers_upstream = self._pool(settings)
        self.admin_upstream = self._pool(settings)
        self.fastapi = build_fastapi(self.admin_upstream, self.workers_upstream)
        self._worker_prefix = WORKER_PATH_PREFIX.encode()
        # Request ids: a random per-process prefix and a counter, unique without a syscall.
        self._id_prefix = uuid.uuid4().hex[:16].encode()
        self._ids = itertools.count(1)

    @staticmethod
    def _pool(settings: Settings) -> UpstreamPool:
        return UpstreamPool(
            settings.orchestrator_host,
            settings.orchestrator_port,
            unix_path=settings.orchestrator_socket,
            timeout_s=settings.proxy_timeout_s,
        )

    def route(self, method: bytes, path: bytes) -> Handler | None:
        if path.startswith(self._worker_prefix):
            return self._forward_worker
        if path.startswith(b"/api/"):
            return self._forward_admin
        return None

    async def _forward_worker(self, request: Request) -> Response:
        return await self._forward(self.workers_upstream, request)

    async def _forward_admin(self, request: Request) -> Response:
        return await self._forward(self.admin_upstream, request)

    async def _forward(self, upstream: UpstreamPool, request: Request) -> Response:
        request_id = b""
        headers: RawHeaders = []
        for name, value in request.headers:
            if name == b"x-request-id":
                if _REQUEST_ID.match(value):
                    request_id = value
            elif name not in _DROP_REQUEST:
                headers.append((name, value))
        if not request_id:
            request_id = b"%s-%x" % (self._id_prefix, next(self._ids))
        headers.append((b"x-forwarded-for", (request.client or "unknown").encode()))
        headers.append((b"x-request-id", request_id))
        try:
            # HEAD goes upstream as GET: the answer's body is then read whole whatever its
            # headers say, and FastLane leaves it out for the client.
            method = "GET" if request.method == b"HEAD" else request.method.decode()
            answer = await upstream.request(method, request.target, headers, request.body)
        except UpstreamUnavailable:
            raise HTTPError(
                503,
                "orchestrator_unreachable",
                "The orchestrator is not answering; retry shortly. Operators: check "
                "`inventiv status` and the orchestrator log.",
                [(b"retry-after", str(ORCHESTRATOR_RETRY_AFTER_S).encode())],
            ) from None
        except UpstreamTimeout:
            raise HTTPError(
                504,
                "orchestrator_timeout",
                f"The orchestrator did not answer within {upstream.timeout_s:g} s; retry shortly.",
                [(b"retry-after", str(ORCHESTRATOR_RETRY_AFTER_S).encode())],
            ) from None
        out = [(n, v) for n, v in answer.headers if n not in _DROP_RESPONSE]
        if not any(n == b"x-request-id" for n, _ in out):
            out.append((b"x-request-id", request_id))
        return Response(answer.status, answer.body, out)


def build_fastapi(upstream: UpstreamPool, *others: UpstreamPool) -> FastAPI:
    """`upstream` answers the health check; every pool given is closed at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for pool in (upstream, *others):
            await pool.close()

    app = FastAPI(
        title="Inventiv API",
        version=__version__,
        description="Control plane for GPU inference workers. The admin API needs "
        "`Authorization: Bearer <INVENTIV_ADMIN_TOKEN>`; the worker protocol is described in "
        "docs/worker-protocol.md.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # Documented here, served by the orchestrator: ApiApp forwards /api/* on FastLane.
    app.include_router(admin_router)

    @app.get("/", response_model=ApiStatus, tags=["status"])
    async def root() -> ApiStatus:
        """The seed's local check: is the API up, and can it reach the orchestrator?"""
        try:
            response = await upstream.request("GET", b"/healthz", [], timeout_s=HEALTH_TIMEOUT_S)
            state = "ok" if response.status == 200 else "unreachable"
        except (UpstreamUnavailable, UpstreamTimeout):
            state = "unreachable"
        return ApiStatus(service="inventiv-api", version=__version__, orchestrator=state)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = add_worker_protocol(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def create_app(settings: Settings | None = None) -> ApiApp:
    from inventiv.config import load_settings

    return ApiApp(settings or load_settings())
