"""The API process, the public edge: forwards the worker protocol and the admin API to the
orchestrator over keep-alive connections, answers the seed's local check `GET /`, and publishes
the OpenAPI document at /docs.
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
from inventiv.asgi import HTTPError, RawHeaders, Receive, Scope, Send, read_body, send_error
from inventiv.config import Settings
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


def forwarded_prefixes() -> tuple[str, ...]:
    return (WORKER_PATH_PREFIX, "/api/")


class ApiApp:
    """Lean forwarding for `/internal/worker/*` and `/api/*`; FastAPI for everything else."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.upstream = UpstreamPool(
            settings.orchestrator_host,
            settings.orchestrator_port,
            unix_path=settings.orchestrator_socket,
            timeout_s=settings.proxy_timeout_s,
        )
        self.fastapi = build_fastapi(self.upstream)
        self._prefixes = forwarded_prefixes()
        # Request ids: a random per-process prefix and a counter, unique without a syscall.
        self._id_prefix = uuid.uuid4().hex[:16].encode()
        self._ids = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self._prefixes):
            try:
                await self._forward(scope, receive, send)
            except HTTPError as exc:
                await send_error(send, exc)
            return
        await self.fastapi(scope, receive, send)

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(scope, receive)
        request_id = b""
        headers: RawHeaders = []
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if _REQUEST_ID.match(value):
                    request_id = value
            elif name not in _DROP_REQUEST:
                headers.append((name, value))
        if not request_id:
            request_id = b"%s-%x" % (self._id_prefix, next(self._ids))
        client = scope.get("client")
        headers.append((b"x-forwarded-for", (client[0] if client else "unknown").encode()))
        headers.append((b"x-request-id", request_id))
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        try:
            response = await self.upstream.request(scope["method"], target, headers, body)
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
                f"The orchestrator did not answer within {self.upstream.timeout_s:g} s; retry "
                "shortly.",
                [(b"retry-after", str(ORCHESTRATOR_RETRY_AFTER_S).encode())],
            ) from None
        out = [(n, v) for n, v in response.headers if n not in _DROP_RESPONSE]
        out.append((b"content-length", str(len(response.body)).encode()))
        if not any(n == b"x-request-id" for n, _ in out):
            out.append((b"x-request-id", request_id))
        await send({"type": "http.response.start", "status": response.status, "headers": out})
        await send({"type": "http.response.body", "body": response.body})


def build_fastapi(upstream: UpstreamPool) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await upstream.close()

    app = FastAPI(
        title="Inventiv API",
        version=__version__,
        description="Control plane for GPU inference workers. The admin API needs "
        "`Authorization: Bearer <INVENTIV_ADMIN_TOKEN>`; the worker protocol is described in "
        "docs/worker-protocol.md.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # Documented here, served by the orchestrator: ApiApp forwards /api/* before FastAPI.
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
