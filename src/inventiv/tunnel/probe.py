"""HTTP probes that classify failures the way the troubleshooting guide talks about them.

"Connection refused" (nothing listens: the API is not started), "DNS" (a quick tunnel URL
whose tunnel is gone), "TLS", "timeout", or an HTTP answer from something — possibly not the
Inventiv API. Each class maps to a different fix, so the probe must tell them apart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import httpx

API_SERVICE_NAME = "inventiv-api"
DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Probe:
    url: str
    outcome: str  # "http" | "refused" | "dns" | "tls" | "timeout" | "error"
    status: int | None = None
    body: Any = None
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.outcome == "http"

    @property
    def json_dict(self) -> dict[str, Any]:
        return self.body if isinstance(self.body, dict) else {}

    @property
    def is_inventiv_api(self) -> bool:
        return self.answered and self.json_dict.get("service") == API_SERVICE_NAME

    def describe(self) -> str:
        if self.answered:
            return f"HTTP {self.status}"
        return f"{self.outcome}: {self.error}"


def _classify(exc: BaseException) -> str:
    text = f"{exc!r} {exc.__cause__!r} {exc.__context__!r}".lower()
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if any(
        m in text
        for m in (
            "name or service not known",
            "nodename nor servname",
            "gaierror",
            "temporary failure in name resolution",
            "no address associated",
        )
    ):
        return "dns"
    if isinstance(exc, ssl.SSLError) or "ssl" in text or "certificate" in text:
        return "tls"
    if "refused" in text or "errno 111" in text:
        return "refused"
    return "error"


def probe(url: str, *, local: bool, timeout: float = DEFAULT_TIMEOUT_S) -> Probe:
    """GET `url`. `local` probes skip proxies and honour no certificate settings; public ones
    honour HTTPS_PROXY and SSL_CERT_FILE like any other client on the machine."""
    try:
        response = httpx.get(url, timeout=timeout, trust_env=not local, follow_redirects=False)
    except httpx.HTTPError as exc:
        return Probe(url, _classify(exc), error=str(exc) or exc.__class__.__name__)
    except (ssl.SSLError, OSError) as exc:
        return Probe(url, _classify(exc), error=str(exc))
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text[:500]
    return Probe(url, "http", status=response.status_code, body=body)
