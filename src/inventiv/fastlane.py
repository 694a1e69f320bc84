"""FastLane: the hot routes (the worker protocol and its forwarding) served straight off the
socket, in front of uvicorn.

Measured here, uvicorn's own per-request work (a task, an ASGI scope, message dicts, two socket
writes) was most of what a heartbeat cost, in both processes. FastLane is the HTTP/1.1 protocol
uvicorn runs for each connection (uvicorn's `http` setting takes a protocol class): it parses
with httptools and answers the routes its router knows in one write, with no ASGI in between.
Any other request hands the connection, with the bytes already received, to uvicorn's own
protocol, so FastAPI keeps serving everything else exactly as before (docs, streaming, lifespan,
graceful shutdown). The connection stays uvicorn's; `RoutesASGI` serves the same handlers in
front of FastAPI, so later fast-route requests on it are still answered, by the slower path.

A handoff needs to know where the other request starts. It does when the request starts a fresh
read (clients that wait for each answer, which all HTTP/1.1 clients in use do); if it arrives
pipelined behind fast requests, FastLane finishes those and closes the connection, and the
client retries on a new one, which is what HTTP/1.1 asks clients to be ready for.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import httptools

from inventiv.config import MAX_BODY_BYTES
from inventiv.errors import HTTPError, error_payload

log = logging.getLogger("inventiv.fastlane")

RawHeaders = list[tuple[bytes, bytes]]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 32
"""Requests parsed ahead of their answer; past this, FastLane stops reading until it catches up."""
JSON_CONTENT_TYPE = (b"content-type", b"application/json")


@dataclass(slots=True)
class Request:
    method: bytes
    path: bytes
    target: bytes
    """The request target as sent: path and query string."""
    headers: RawHeaders
    """Names lower-cased, in the order received."""
    body: bytes
    client: str | None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def bearer_token(self) -> str | None:
        """The token of `Authorization: Bearer <token>`, or None when absent or malformed."""
        raw = self.header(b"authorization")
        if raw is None:
            return None
        scheme, _, token = raw.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        return token


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    headers: RawHeaders
    """Everything but content-length, date and connection, which FastLane writes."""


def json_response(status: int, body: bytes, headers: RawHeaders | None = None) -> Response:
    return Response(status, body, [JSON_CONTENT_TYPE, *(headers or ())])


def error_response(error: HTTPError) -> Response:
    return json_response(error.status, error_payload(error.code, error.message), error.headers)


Handler = Callable[[Request], Awaitable[Response]]
Router = Callable[[bytes, bytes], Handler | None]
"""(method, path) -> the handler that serves it here, or None to leave it to uvicorn."""


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


_STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}


class _HandOff(Exception):
    """Stops the parser at the headers of a request FastLane does not serve."""


class _Reject(Exception):
    """Stops the parser on a request refused before its body is read (413, 431)."""

    def __init__(self, error: HTTPError) -> None:
        self.error = error


class FastLaneProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection; constructed by uvicorn with the arguments of its own protocols."""

    router: Router
    fallback: Callable[..., asyncio.Protocol]
    """uvicorn's own protocol class, which takes over connections FastLane does not serve."""
    request_timeout_s: float
    """A request must arrive whole (a new connection: begin) within this; else 408 and close."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._config = config
        self._server_state = server_state
        self._app_state = app_state
        self._loop = _loop or asyncio.get_event_loop()
        self._keep_alive_s: float = config.timeout_keep_alive
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._client: str | None = None
        # Requests parsed and waiting for their turn; the head of the queue is being answered.
        self._queue: deque[tuple[Handler, Request, bool]] = deque()
        self._closing = False
        self._paused_writing = False
        self._paused_queue = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._in_request = False
        # The request being parsed.
        self._url = b""
        self._headers: RawHeaders = []
        self._header_bytes = 0
        self._handler: Handler | None = None
        self._body: list[bytes] = []
        self._body_bytes = 0
        # Raw bytes since the current request started, kept until its route is known, and
        # whether it started at the first byte of a read (so its bytes can be handed over).
        self._raw: list[bytes] = []
        self._completed_in_read = False
        self._starts_read = False
        self._handoff: list[bytes] | None = None

    # asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._server_state.connections.add(self)
        self._arm_deadline()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._client = str(peer[0])

    def connection_lost(self, exc: Exception | None) -> None:
        self._server_state.connections.discard(self)
        self._closing = True
        self._cancel_idle_timer()
        self._cancel_deadline()

    def data_received(self, data: bytes) -> None:
        if self._handoff is not None:
            self._handoff.append(data)
            return
        if self._closing:
            return
        self._cancel_idle_timer()
        self._completed_in_read = False
        self._raw.append(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HandOff):
                self._begin_handoff()
            elif isinstance(cause, _Reject):
                self._refuse(cause.error)
            else:
                log.exception("fastlane callback failed", exc_info=cause)
                self._refuse(HTTPError(500, "internal_error", "The server failed; retry."))
        except httptools.HttpParserUpgrade:
            pass  # an upgrade on a fast route: its headers were answered or handed off already
        except httptools.HttpParserError:
            self._refuse(HTTPError(400, "invalid_http", "The request is not valid HTTP/1.1."))

    def pause_writing(self) -> None:
        self._paused_writing = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._resume_reading()

    def _resume_reading(self) -> None:
        if self._paused_writing or self._paused_queue or self._handoff is not None:
            return
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close now if idle, else after the answers in flight."""
        self._closing = True
        if not self._queue and self._transport is not None:
            self._transport.close()

    # httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # A request that begins before any other completed in this read began at its first byte.
        self._starts_read = not self._completed_in_read
        if self._starts_read:
            self._raw = self._raw[-1:]
        else:
            self._raw = []
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_bytes = 0
        self._handler = None
        self._in_request = True
        self._arm_deadline()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Reject(HTTPError(414, "url_too_long", "The request target is too long."))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Reject(HTTPError(431, "headers_too_large", "The request headers exceed 64 KiB."))
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        path, _, _ = self._url.partition(b"?")
        handler = self.router(self._parser.get_method(), path)
        if handler is None:
            raise _HandOff
        self._handler = handler
        self._raw = []
        expect_continue = False
        for name, value in self._headers:
            if name == b"content-length":
                try:
                    check_content_length(value)
                except HTTPError as exc:
                    raise _Reject(exc) from None
            elif name == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
        if expect_continue and not self._queue and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            raise _Reject(too_large())
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._completed_in_read = True
        self._in_request = False
        self._cancel_deadline()
        handler = self._handler
        assert handler is not None
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        path, _, _ = self._url.partition(b"?")
        request = Request(
            self._parser.get_method(), path, self._url, self._headers, body, self._client
        )
        self._queue.append((handler, request, self._parser.should_keep_alive()))
        if len(self._queue) == 1:
            self._start_next()
        elif len(self._queue) >= MAX_PIPELINED and self._transport is not None:
            self._paused_queue = True
            self._transport.pause_reading()

    # answering ------------------------------------------------------------------------------

    def _start_next(self) -> None:
        handler, request, _ = self._queue[0]
        task = self._loop.create_task(self._answer(handler, request))
        tasks = self._server_state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _answer(self, handler: Handler, request: Request) -> None:
        response = await answer(handler, request)
        _, _, keep_alive = self._queue.popleft()
        # A closing connection still answers everything queued; only the last answer closes it.
        keep_alive = keep_alive and not (self._closing and not self._queue)
        self._write(response, keep_alive, with_body=request.method != b"HEAD")
        self._server_state.total_requests += 1
        if self._transport is None or self._transport.is_closing():
            self._queue.clear()
            return
        if self._paused_queue and len(self._queue) < MAX_PIPELINED // 2:
            self._paused_queue = False
            self._resume_reading()
        if self._queue:
            self._start_next()
        elif self._handoff is not None:
            self._hand_over()
        elif self._closing:
            self._transport.close()
        else:
            self._idle_timer = self._loop.call_later(self._keep_alive_s, self._idle_timeout)

    def _write(self, response: Response, keep_alive: bool, with_body: bool = True) -> None:
        """One write per answer. A HEAD answer says the length of the body it leaves out."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        parts = [_STATUS_LINES[response.status]]
        for name, value in (*response.headers, *self._server_state.default_headers):
            parts += [name, b": ", value, b"\r\n"]
        parts += [b"content-length: ", str(len(response.body)).encode(), b"\r\n"]
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if with_body:
            parts.append(response.body)
        transport.write(b"".join(parts))
        if not keep_alive:
            self._closing = True
            transport.close()

    def _refuse(self, error: HTTPError) -> None:
        """Answer a request that cannot be read further (after the answers before it), then
        close: its body stays unread."""

        async def refusal(request: Request) -> Response:
            raise error

        request = Request(b"", b"", self._url, self._headers, b"", self._client)
        self._queue.append((refusal, request, False))
        self._closing = True
        if len(self._queue) == 1:
            self._start_next()

    # handing a connection to uvicorn --------------------------------------------------------

    def _begin_handoff(self) -> None:
        assert self._transport is not None
        if not self._starts_read:
            # Pipelined behind fast requests: where it starts is unknown. Finish and close.
            self._closing = True
            if not self._queue:
                self._transport.close()
            return
        self._handoff = self._raw
        self._raw = []
        self._transport.pause_reading()
        if not self._queue:
            self._hand_over()

    def _hand_over(self) -> None:
        transport = self._transport
        assert transport is not None and self._handoff is not None
        self._cancel_idle_timer()
        self._cancel_deadline()
        self._server_state.connections.discard(self)
        protocol = self.fallback(
            config=self._config,
            server_state=self._server_state,
            app_state=self._app_state,
            _loop=self._loop,
        )
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data = b"".join(self._handoff)
        self._handoff = None
        protocol.data_received(data)
        if not transport.is_closing():
            transport.resume_reading()

    # ----------------------------------------------------------------------------------------

    def _arm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._loop.call_later(self.request_timeout_s, self._request_timeout)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request_timeout(self) -> None:
        """A request trickling in (or a connection that never sends one) holds a socket and
        parser state for nothing: answer 408 if a request began, and close."""
        self._deadline = None
        if self._transport is None or self._closing or self._handoff is not None:
            return
        if self._in_request:
            self._refuse(
                HTTPError(
                    408,
                    "request_timeout",
                    f"The request did not arrive whole within {self.request_timeout_s:g} s; "
                    "send it again.",
                )
            )
        elif not self._queue:
            self._closing = True
            self._transport.close()

    def _idle_timeout(self) -> None:
        if self._transport is not None and not self._queue:
            self._transport.close()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


async def answer(handler: Handler, request: Request) -> Response:
    """Run a handler; whatever goes wrong still answers with the standard error body."""
    try:
        return await handler(request)
    except HTTPError as exc:
        return error_response(exc)
    except Exception:
        log.exception("%s %s failed", request.method.decode(), request.path.decode())
        return error_response(
            HTTPError(500, "internal_error", "The server failed on this request; retry.")
        )


class RoutesASGI:
    """The same routes for an ASGI server, in front of the app that serves the rest.

    A connection FastLane handed to uvicorn stays uvicorn's, and may still carry worker calls
    (a tunnel's pooled connections carry everything), so uvicorn must answer them too; and the
    app stays whole under any ASGI server.
    """

    def __init__(self, router: Router, app: ASGIApp) -> None:
        self.router = router
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: bytes = scope.get("raw_path") or scope["path"].encode()
            handler = self.router(scope["method"].encode(), path)
            if handler is not None:
                await self._serve(handler, path, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self, handler: Handler, path: bytes, scope: Scope, receive: Receive, send: Send
    ) -> None:
        target = path + b"?" + scope["query_string"] if scope.get("query_string") else path
        client = scope.get("client")
        headers: RawHeaders = list(scope["headers"])
        try:
            body = await read_body(headers, receive)
        except HTTPError as exc:
            response = error_response(exc)
        else:
            request = Request(
                scope["method"].encode(), path, target, headers, body, client[0] if client else None
            )
            response = await answer(handler, request)
        out = [*response.headers, (b"content-length", str(len(response.body)).encode())]
        await send({"type": "http.response.start", "status": response.status, "headers": out})
        await send({"type": "http.response.body", "body": response.body})


async def read_body(headers: RawHeaders, receive: Receive) -> bytes:
    """An ASGI request body, refused with 413 as soon as it is known to be too large."""
    for name, value in headers:
        if name == b"content-length":
            check_content_length(value)
    chunks: list[bytes] = []
    total = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(400, "client_disconnected", "The client went away mid-request.")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise too_large()
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def check_content_length(value: bytes) -> None:
    """Refuse a declared body length before a single body byte is read."""
    if not value.isdigit():
        raise HTTPError(400, "invalid_content_length", "The Content-Length header is not a number.")
    if int(value) > MAX_BODY_BYTES:
        raise too_large()


def too_large() -> HTTPError:
    return HTTPError(
        413,
        "body_too_large",
        f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB; send a smaller body.",
    )


def fastlane_protocol(router: Router, request_timeout_s: float) -> type[FastLaneProtocol]:
    """The protocol class to give uvicorn (`uvicorn.Config(http=...)`) for this router."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    attributes = {
        "router": staticmethod(router),
        "fallback": HttpToolsProtocol,
        "request_timeout_s": request_timeout_s,
    }
    return type("FastLane", (FastLaneProtocol,), attributes)
