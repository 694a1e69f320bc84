"""One error shape for the FastAPI parts too: `{"error": code, "message": sentence}`.

FastAPI's own 422 lists pydantic errors; operators need one sentence naming the field and what
to write instead, and malformed JSON is a 400, not a validation error.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from inventiv.errors import HTTPError, error_payload

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        error_payload(code, message),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[int, str, str]:
    """Turn pydantic errors into (status, code, sentence)."""
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = err.get("ctx", {}).get("error", "")
            return 400, "malformed_json", f"The request body is not valid JSON ({detail})."
    parts = []
    for err in errors[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        if field == "body":
            parts.append(
                "The request body must be a JSON object sent with Content-Type: application/json"
            )
        elif err.get("type") == "extra_forbidden":
            parts.append(f"Field '{field}' is not part of this API; remove it")
        elif err.get("type") == "missing":
            parts.append(f"Field '{field}' is required")
        else:
            parts.append(f"Field '{field}': {err.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return 422, "invalid_field", "; ".join(parts) + more + "."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(_: Request, exc: HTTPError) -> Response:
        headers = {k.decode(): v.decode() for k, v in exc.headers}
        return error_response(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        status, code, message = describe_validation_errors(list(exc.errors()))
        return error_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException) -> Response:
        code = _STATUS_CODES.get(exc.status_code, "error")
        if exc.status_code == 404:
            message = f"No route {request.url.path}; see /docs for the API."
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs."
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))
