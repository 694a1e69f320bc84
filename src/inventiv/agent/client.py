"""The two control-plane calls (register, heartbeat) over one keep-alive httpx client, with
every failure turned into a CallFailed whose `kind` tells the loop what to do next."""

from __future__ import annotations

import ssl
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import certifi
import httpx
from pydantic import BaseModel, ValidationError

from inventiv import __version__
from inventiv.protocol import (
    HEARTBEAT_PATH,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    REGISTER_PATH,
    REQUEST_ID_HEADER,
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
)

ResponseT = TypeVar("ResponseT", bound=BaseModel)
USER_AGENT = f"inventiv-worker/{__version__}"


class FailureKind(StrEnum):
    """What a failed call means for the agent."""

    UNREACHABLE = "unreachable"  # network error, timeout, 5xx: back off, re-read the URL file
    UNAUTHORIZED = "unauthorized"  # 401: re-register with another token (or exit if revoked)
    GONE = "gone"  # 404 instance_not_found, 409 terminating: stop the engine, exit
    FORBIDDEN = "forbidden"  # 403: INSTANCE_ID and token disagree; retrying cannot fix it
    REJECTED = "rejected"  # other 4xx or an unreadable answer: log it, back off


@dataclass
class CallFailed(Exception):
    kind: FailureKind
    status: int | None
    code: str | None
    message: str
    retry_after_s: float | None = None

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no response"
        code = f" {self.code}" if self.code else ""
        return f"{where}{code}: {self.message}"


def build_http_client(
    timeout_s: float = 10.0,
    ca_bundle: Path | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """One pooled client for the agent's lifetime; WORKER_CA_BUNDLE is trusted on top of the
    usual public roots (a self-signed proxy in tests, a private CA in some deployments)."""
    context = ssl.create_default_context(cafile=certifi.where())
    if ca_bundle is not None:
        context.load_verify_locations(cafile=str(ca_bundle))
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        verify=context,
        transport=transport,
        headers={"user-agent": USER_AGENT, PROTOCOL_HEADER: str(PROTOCOL_VERSION)},
        follow_redirects=False,
        trust_env=False,
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def classify(response: httpx.Response) -> CallFailed:
    """Map an error response to what the agent should do about it.

    404/409 only mean "gone" with one of our error codes: a 404 from whatever answers at a
    stale tunnel URL is a reachability problem, not a death sentence for the worker.
    """
    code: str | None = None
    message = response.reason_phrase or "error"
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            code = body["error"]
            message = str(body.get("message") or message)
    except ValueError:
        pass
    status = response.status_code
    if status == 401:
        kind = FailureKind.UNAUTHORIZED
    elif status == 403:
        kind = FailureKind.FORBIDDEN
    elif (status == 404 and code == "instance_not_found") or (status == 409 and code):
        kind = FailureKind.GONE
    elif status >= 500 or status in (404, 408, 429):
        kind = FailureKind.UNREACHABLE
    else:
        kind = FailureKind.REJECTED
    return CallFailed(kind, status, code, message[:500], _retry_after(response))


def _parse(model: type[ResponseT], response: httpx.Response) -> ResponseT:
    """Validate a success body; fields a newer control plane added are ignored, not fatal."""
    try:
        data = response.json()
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {k: v for k, v in data.items() if k in model.model_fields}
        return model.model_validate(known)
    except (ValueError, ValidationError) as exc:
        raise CallFailed(
            FailureKind.REJECTED,
            response.status_code,
            "bad_response",
            f"unreadable {model.__name__}: {exc}",
        ) from None


class ControlPlaneClient:
    """POSTs the protocol messages to {base_url}/internal/worker/..., bearer-authenticated."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def register(self, base_url: str, token: str, body: RegisterRequest) -> RegisterResponse:
        response = await self._post(base_url + REGISTER_PATH, token, body)
        return _parse(RegisterResponse, response)

    async def heartbeat(
        self, base_url: str, token: str, body: HeartbeatRequest
    ) -> HeartbeatResponse:
        response = await self._post(base_url + HEARTBEAT_PATH, token, body)
        return _parse(HeartbeatResponse, response)

    async def _post(self, url: str, token: str, body: BaseModel) -> httpx.Response:
        try:
            response = await self.http.post(
                url,
                content=body.model_dump_json(exclude_none=True),
                headers={
                    "authorization": f"Bearer {token}",
                    "content-type": "application/json",
                    REQUEST_ID_HEADER: uuid.uuid4().hex,
                },
            )
        except httpx.HTTPError as exc:
            detail = str(exc) or type(exc).__name__
            raise CallFailed(FailureKind.UNREACHABLE, None, None, detail) from None
        if response.status_code >= 300:
            raise classify(response)
        return response
