"""A small keep-alive HTTP/1.1 client pool for the API -> orchestrator hop.

The proxy sits on the heartbeat hot path, where a general-purpose client costs several times
the work of the whole orchestrator request. This pool keeps idle connections to one upstream,
writes each request in one `write`, parses answers with httptools, and enforces a connect
timeout and a whole-request deadline, so a dead orchestrator answers fast instead of hanging.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import httptools

RawHeaders = list[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer in time."""


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class _ClosedBeforeResponse(UpstreamError):
    """The connection closed before any response byte: safe to retry on a fresh one."""


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: RawHeaders
    body: bytes


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: RawHeaders = []
        self._body: list[bytes] = []
        self._received = False

    # asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._received = True
        if self._parser is None:
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamUnavailable(f"upstream sent an invalid response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._received:
            self._fail(UpstreamUnavailable("upstream closed the connection mid-response"))
        else:
            self._fail(_ClosedBeforeResponse("upstream closed the connection"))

    # httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        waiter = self._waiter
        assert parser is not None
        if 100 <= parser.get_status_code() < 200:
            # An interim answer (100 Continue): the final one follows on the same parser.
            self._headers = []
            self._body = []
            return
        if not parser.should_keep_alive():
            self.close()
        if waiter is not None and not waiter.done():
            body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
            waiter.set_result(UpstreamResponse(parser.get_status_code(), self._headers, body))
        self._parser = None

    # ----------------------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def send(self, data: bytes, deadline_s: float) -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._headers = []
        self._body = []
        self._received = False
        assert self.transport is not None
        self.transport.write(data)
        timer = loop.call_later(deadline_s, self._fail, UpstreamTimeout("upstream timed out"))
        try:
            return await self._waiter
        finally:
            timer.cancel()
            self._waiter = None


class UpstreamPool:
    """Keep-alive connections to one host:port, reused last-in first-out."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        max_idle: int = 128,
        unix_path: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._idle: deque[_Connection] = deque()
        self._max_idle = max_idle
        self._host_header = f"{host}:{port}".encode()

    async def _connect(self) -> _Connection:
        """Prefer the Unix socket when the orchestrator publishes one; a stale socket file
        (orchestrator gone, or in another container) falls back to TCP."""
        loop = asyncio.get_running_loop()
        if self.unix_path is not None and self.unix_path.exists():
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_unix_connection(_Connection, str(self.unix_path)),
                    self.connect_timeout_s,
                )
                return conn
            except (OSError, TimeoutError):
                pass
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port),
                self.connect_timeout_s,
            )
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise UpstreamUnavailable(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        return conn

    def _encode(self, method: str, target: bytes, headers: RawHeaders, body: bytes) -> bytes:
        lines = [method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", self._host_header]
        for name, value in headers:
            lines += [b"\r\n", name, b": ", value]
        lines += [b"\r\ncontent-length: ", str(len(body)).encode(), b"\r\n\r\n", body]
        return b"".join(lines)

    async def request(
        self,
        method: str,
        target: bytes,
        headers: RawHeaders,
        body: bytes = b"",
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; `headers` must not contain host or content-length."""
        data = self._encode(method, target, headers, body)
        deadline = timeout_s or self.timeout_s
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            try:
                response = await conn.send(data, deadline)
            except _ClosedBeforeResponse:
                continue  # the server closed an idle connection: try another
            except UpstreamError:
                conn.close()
                raise
            self._release(conn)
            return response
        conn = await self._connect()
        try:
            response = await conn.send(data, deadline)
        except _ClosedBeforeResponse:
            conn.close()
            raise UpstreamUnavailable("upstream closed the connection without answering") from None
        except UpstreamError:
            conn.close()
            raise
        self._release(conn)
        return response

    def _release(self, conn: _Connection) -> None:
        if conn.closed or len(self._idle) >= self._max_idle:
            conn.close()
        else:
            self._idle.append(conn)

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
