"""Adds the worker protocol to the API's OpenAPI document.

The worker routes are FastLane handlers, not FastAPI routes, so FastAPI cannot see
them; their schemas are generated here from the same pydantic messages the handlers parse.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from inventiv.protocol import (
    HEARTBEAT_PATH,
    PING_PATH,
    REGISTER_PATH,
    ErrorBody,
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
)

_WORKER_ERRORS = {
    "400": "Malformed JSON",
    "401": "Missing, unknown, used, expired or revoked token",
    "403": "Token of another instance",
    "404": "Unknown instance",
    "409": "Instance terminating",
    "413": "Body over 64 KiB",
    "422": "Invalid field",
    "503": "Orchestrator unreachable (retry after Retry-After seconds)",
}


def _ref(schema: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in generated.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components[model.__name__] = generated
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(ref: dict[str, str]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": ref}}}


def add_worker_protocol(schema: dict[str, Any]) -> dict[str, Any]:
    error = _ref(schema, ErrorBody)
    errors = {code: {"description": text, **_json(error)} for code, text in _WORKER_ERRORS.items()}
    security = [{"WorkerToken": []}]
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["WorkerToken"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "The instance's bootstrap token (first register) or its worker token.",
    }
    paths = schema.setdefault("paths", {})
    for path, request, response, summary in (
        (REGISTER_PATH, RegisterRequest, RegisterResponse, "Register a worker"),
        (HEARTBEAT_PATH, HeartbeatRequest, HeartbeatResponse, "Worker heartbeat"),
    ):
        paths[path] = {
            "post": {
                "tags": ["worker protocol"],
                "summary": summary,
                "operationId": summary.lower().replace(" ", "_"),
                "security": security,
                "requestBody": {"required": True, **_json(_ref(schema, request))},
                "responses": {"200": {"description": "OK", **_json(_ref(schema, response))}}
                | errors,
            }
        }
    paths[PING_PATH] = {
        "get": {
            "tags": ["worker protocol"],
            "summary": "Check the worker path end to end (API -> orchestrator), unauthenticated",
            "operationId": "worker_ping",
            "responses": {
                "200": {"description": "The orchestrator answered"},
                "503": {"description": "Orchestrator unreachable", **_json(error)},
            },
        }
    }
    return schema
