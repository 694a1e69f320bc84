"""The one error shape every Inventiv service answers with: `{"error": code, "message": sentence}`.

Services raise `HTTPError`; FastLane and the FastAPI handlers turn it into that body.
"""

from __future__ import annotations

import json
from collections.abc import Iterable


class HTTPError(Exception):
    """An answer with the standard error body, raised from anywhere below a route."""

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
