"""Lean ASGI helpers for the hot paths (worker protocol, proxy): bounded body reads, JSON and
error responses, without a framework's per-request machinery.

Every error any Inventiv service returns goes through `error_response`, so the body is always
`{"error": code, "message": sentence}`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from inventiv.config import MAX_BODY_BYTES

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]

JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class HTTPError(Exception):
    """Raised inside a lean handler to answer with the standard error body."""

    def __init__(
        self, status: int, code: str, message: str, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)


def error_payload(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}).encode()


def header_value(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def bearer_token(scope: Scope) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None when absent or malformed."""
    raw = header_value(scope, b"authorization")
    if raw is None:
        return None
    scheme, _, token = raw.decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


async def read_body(scope: Scope, receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes:
    """Read a request body, refusing with 413 as soon as it is known to exceed `limit`.

    A declared Content-Length over the limit is refused before a single body byte is read; a
    chunked body is refused as soon as the running total passes the limit.
    """
    declared = header_value(scope, b"content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise HTTPError(
                400, "invalid_content_length", "The Content-Length header is not a number."
            ) from None
        if length > limit:
            raise too_large(limit)
    chunks: list[bytes] = []
    total = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(400, "client_disconnected", "The client went away mid-request.")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        if chunk:
            chunks.append(chunk)
        more = message.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def too_large(limit: int) -> HTTPError:
    return HTTPError(
        413,
        "body_too_large",
        f"The request body is larger than {limit // 1024} KiB; send a smaller body.",
    )


async def send_response(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    all_headers = [JSON_CONTENT_TYPE, (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, payload: Any, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    await send_response(send, status, json.dumps(payload).encode(), headers)


async def send_error(send: Send, error: HTTPError) -> None:
    await send_response(send, error.status, error_payload(error.code, error.message), error.headers)
