"""Tell the running control plane its new public URL, so nothing has to restart.

The API endpoint (`PUT /api/control-plane-url`) stores the URL and pushes it to every live
worker; this module only makes the call and turns each failure into a sentence with a fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from inventiv.config import Settings

CONTROL_PLANE_URL_PATH = "/api/control-plane-url"
ANNOUNCE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class AnnounceResult:
    ok: bool
    message: str
    body: dict[str, Any] | None = None


def announce_url(
    settings: Settings, url: str, *, timeout: float = ANNOUNCE_TIMEOUT_S
) -> AnnounceResult:
    """PUT the URL to the local API with the admin token; never raises."""
    token, _ = settings.resolve_admin_token()
    endpoint = settings.api_local_url + CONTROL_PLANE_URL_PATH
    try:
        response = httpx.put(
            endpoint,
            json={"url": url},
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            trust_env=False,  # loopback: never through an HTTP(S)_PROXY
        )
    except httpx.HTTPError as exc:
        return AnnounceResult(
            False,
            f"the control plane did not answer on {settings.api_local_url} "
            f"({exc.__class__.__name__}). The URL is saved in the env file and will be used "
            "when the API starts; start it with `make api-expose` (or `inventiv expose`).",
        )
    body = _json_or_none(response)
    if response.is_success:
        return AnnounceResult(True, "the control plane accepted it", body)
    if response.status_code in (401, 403):
        return AnnounceResult(
            False,
            f"the control plane refused the admin token (HTTP {response.status_code}). Run this "
            "command with the same INVENTIV_ADMIN_TOKEN / PORT_OFFSET / INVENTIV_DATA_DIR as the "
            "API.",
            body,
        )
    if response.status_code in (404, 405):
        return AnnounceResult(
            False,
            f"{endpoint} does not exist (HTTP {response.status_code}): is something other than "
            "the Inventiv API on this port, or an older API? Restart the API so it reads the "
            "env file.",
            body,
        )
    detail = body.get("message") if isinstance(body, dict) else response.text[:200]
    return AnnounceResult(
        False, f"the control plane rejected the URL (HTTP {response.status_code}): {detail}", body
    )


def _json_or_none(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
