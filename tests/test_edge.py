"""The API edge: the seed's local check, forwarding details, the orchestrator going away and
coming back, restarts that lose nothing."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.conftest import Stack
from tests.test_worker_protocol import (
    HEARTBEAT,
    REGISTER,
    assert_error,
    call,
    heartbeat_body,
    register_body,
    registered,
)


def test_root_is_the_seed_local_check(stack: Stack) -> None:
    body = httpx.get(stack.api_url + "/", trust_env=False).json()
    assert body["service"] == "inventiv-api"
    assert body["orchestrator"] == "ok"
    assert body["version"]


def test_client_sent_forwarded_for_is_not_trusted(stack: Stack) -> None:
    created = stack.create_instance()
    response = httpx.post(
        stack.api_url + REGISTER,
        json=register_body(created["id"]),
        headers={
            "authorization": f"Bearer {created['bootstrap_token']}",
            "x-forwarded-for": "6.6.6.6",
            "x-request-id": "req-abc-123",
        },
        trust_env=False,
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-abc-123"
    assert stack.get_instance(created["id"])["address"] == "127.0.0.1"
    generated = httpx.get(stack.api_url + "/internal/worker/ping", trust_env=False)
    assert generated.json()["ok"] is True
    assert len(generated.headers["x-request-id"]) >= 16


def test_admin_api_needs_the_admin_token(stack: Stack) -> None:
    anonymous = httpx.get(stack.api_url + "/api/instances", trust_env=False)
    assert_error(anonymous, 401, "missing_token")
    wrong = httpx.get(
        stack.api_url + "/api/instances", headers={"authorization": "Bearer nope"}, trust_env=False
    )
    assert_error(wrong, 401, "invalid_token")
    # A worker token is not an admin token either.
    _, worker_token = registered(stack)
    as_worker = httpx.get(
        stack.api_url + "/api/instances",
        headers={"authorization": f"Bearer {worker_token}"},
        trust_env=False,
    )
    assert_error(as_worker, 401, "invalid_token")


def test_admin_errors_say_what_to_fix(stack: Stack) -> None:
    assert_error(stack.client.get(f"/api/instances/{uuid.uuid4()}"), 404, "instance_not_found")
    body = assert_error(stack.client.get("/api/instances/not-a-uuid"), 422, "invalid_field")
    assert "UUID" in body["message"]
    body = assert_error(
        stack.client.post("/api/instances", json={"provider": "nowhere", "model": "echo"}),
        422,
        "invalid_field",
    )
    assert "provider" in body["message"]
    body = assert_error(
        stack.client.post("/api/instances", json={"provider": "manual"}), 422, "invalid_field"
    )
    assert "model" in body["message"]
    assert_error(
        stack.client.post(
            "/api/instances", content=b"{nope", headers={"content-type": "application/json"}
        ),
        400,
        "malformed_json",
    )
    assert_error(stack.client.get("/api/nothing-here"), 404, "not_found")
    assert_error(httpx.get(stack.api_url + "/internal/admin", trust_env=False), 404, "not_found")


def test_list_and_events(stack: Stack) -> None:
    a = stack.create_instance()
    b = stack.create_instance(model="Qwen/Qwen2.5-7B-Instruct")
    listing = stack.client.get("/api/instances").json()
    assert {a["id"], b["id"]} <= {i["id"] for i in listing["items"]}
    assert listing["count"] == len(listing["items"])
    b_view = stack.get_instance(b["id"])
    assert "bootstrap_token" not in b_view  # shown once, at creation only
    assert b_view["model"] == "Qwen/Qwen2.5-7B-Instruct"
    events = stack.events(a["id"])
    assert events[0]["kind"] == "created" and events[0]["reason"] == "operator_request"


def test_openapi_documents_admin_and_worker_paths(stack: Stack) -> None:
    schema = httpx.get(stack.api_url + "/openapi.json", trust_env=False).json()
    for path in ("/api/instances", "/api/instances/{instance_id}", REGISTER, HEARTBEAT):
        assert path in schema["paths"], path
    assert "RegisterRequest" in schema["components"]["schemas"]
    assert httpx.get(stack.api_url + "/docs", trust_env=False).status_code == 200


def test_orchestrator_down_gives_503_quickly_then_recovers(stack: Stack) -> None:
    instance_id, token = registered(stack)
    stack.stop_orchestrator(kill=True)
    started = time.monotonic()
    response = call(stack, HEARTBEAT, token, heartbeat_body(instance_id))
    elapsed = time.monotonic() - started
    body = assert_error(response, 503, "orchestrator_unreachable")
    assert "retry" in body["message"]
    assert int(response.headers["retry-after"]) > 0
    assert elapsed < 1.0, f"503 took {elapsed:.2f} s"
    root = httpx.get(stack.api_url + "/", trust_env=False).json()
    assert root["orchestrator"] == "unreachable"

    stack.start_orchestrator()
    response = call(stack, HEARTBEAT, token, heartbeat_body(instance_id, seq=2))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_restart_keeps_instances_and_tokens(stack_factory, db: str) -> None:
    stack = stack_factory(db=db)
    instance_id, token = registered(stack)
    spare = stack.create_instance()
    assert call(stack, HEARTBEAT, token, heartbeat_body(instance_id, seq=1)).status_code == 200
    stack.stop()
    stack.start()
    assert stack.get_instance(instance_id)["status"] in ("ready", "unreachable")
    assert call(stack, HEARTBEAT, token, heartbeat_body(instance_id, seq=2)).status_code == 200
    # The unused bootstrap token survived too, and is still single use.
    first = call(stack, REGISTER, spare["bootstrap_token"], register_body(spare["id"]))
    assert first.status_code == 200, first.text
