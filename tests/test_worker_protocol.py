"""The worker protocol through the API proxy, on SQLite and on PostgreSQL: every status code,
the token lifecycle (bootstrap -> worker token -> revoked), and the seed's own curl sample."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from tests.conftest import Stack

REGISTER = "/internal/worker/register"
HEARTBEAT = "/internal/worker/heartbeat"


def call(stack: Stack, path: str, token: str | None, body: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(stack.api_url + path, json=body, headers=headers, timeout=10, trust_env=False)


def register_body(instance_id: str, worker_id: str | None = None, **extra: object) -> dict:
    return {
        "instance_id": instance_id,
        "worker_id": worker_id or str(uuid.uuid4()),
        "agent_version": "0.1.0",
        **extra,
    }


def heartbeat_body(instance_id: str, seq: int = 1, status: str = "ready", **extra: object) -> dict:
    return {
        "instance_id": instance_id,
        "worker_id": str(uuid.uuid4()),
        "seq": seq,
        "status": status,
        **extra,
    }


def registered(stack: Stack) -> tuple[str, str]:
    """A new manual instance, registered: (instance id, worker token)."""
    created = stack.create_instance()
    response = call(stack, REGISTER, created["bootstrap_token"], register_body(created["id"]))
    assert response.status_code == 200, response.text
    return created["id"], response.json()["worker_token"]


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == code
    assert body["message"].endswith((".", ")")) and len(body["message"]) > 20
    return body


def test_seed_curl_sample_gets_a_clear_401(db_stack: Stack) -> None:
    response = httpx.post(
        db_stack.api_url + REGISTER,
        content=b'{"instance_id":"test","worker_id":"test"}',
        headers={"Content-Type": "application/json"},
        trust_env=False,
    )
    body = assert_error(response, 401, "missing_token")
    assert "Bearer" in body["message"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_seed_sample_with_a_token_names_the_invalid_field(db_stack: Stack) -> None:
    response = call(db_stack, REGISTER, "anything", {"instance_id": "test", "worker_id": "test"})
    body = assert_error(response, 422, "invalid_field")
    assert "instance_id" in body["message"]


def test_malformed_json_is_400(db_stack: Stack) -> None:
    response = httpx.post(
        db_stack.api_url + HEARTBEAT,
        content=b'{"instance_id": ',
        headers={"authorization": "Bearer x", "content-type": "application/json"},
        trust_env=False,
    )
    assert_error(response, 400, "malformed_json")


def test_unknown_field_is_refused(db_stack: Stack) -> None:
    instance_id, token = registered(db_stack)
    response = call(db_stack, HEARTBEAT, token, heartbeat_body(instance_id, gpu_count=3))
    body = assert_error(response, 422, "invalid_field")
    assert "gpu_count" in body["message"]


def test_unknown_instance_is_404(db_stack: Stack) -> None:
    response = call(db_stack, REGISTER, "tok", register_body(str(uuid.uuid4())))
    assert_error(response, 404, "instance_not_found")


def test_bootstrap_then_worker_token_then_heartbeats(db_stack: Stack) -> None:
    created = db_stack.create_instance()
    assert created["status"] == "provisioning"
    assert created["agent_env"]["INSTANCE_ID"] == created["id"]
    assert created["agent_env"]["INVENTIV_BOOTSTRAP_TOKEN"] == created["bootstrap_token"]
    worker_id = str(uuid.uuid4())
    gpus = [{"index": 0, "name": "NVIDIA L4", "memory_total_mb": 23034}]
    response = call(
        db_stack,
        REGISTER,
        created["bootstrap_token"],
        register_body(created["id"], worker_id, gpus=gpus, engine_port=8000, health_port=8080),
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["worker_token"] and answer["worker_token"] != created["bootstrap_token"]
    assert answer["heartbeat_interval_s"] > 0
    assert answer["status"] == "starting"
    token = answer["worker_token"]

    hb = heartbeat_body(
        created["id"],
        seq=7,
        queue_depth=3,
        requests_running=2,
        gpus=[{"index": 0, "utilization": 87.5, "memory_used_mb": 20123, "memory_total_mb": 23034}],
        system={"cpu_percent": 12.5, "load1": 0.7},
    )
    response = call(db_stack, HEARTBEAT, token, hb)
    assert response.status_code == 200, response.text
    assert response.json()["desired_state"] == "run"

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        view = db_stack.get_instance(created["id"])
        if view["heartbeat_seq"] == 7:
            break
        time.sleep(0.1)
    assert view["heartbeat_seq"] == 7
    assert view["status"] == "ready"
    assert view["worker_id"] == worker_id
    assert view["gpus"] == gpus
    assert view["queue_depth"] == 3 and view["requests_running"] == 2
    assert view["metrics"]["gpus"][0]["utilization"] == 87.5
    assert view["last_heartbeat_at"] is not None

    # An agent restart re-registers with its worker token and gets no new token.
    again = call(db_stack, REGISTER, token, register_body(created["id"], worker_id))
    assert again.status_code == 200, again.text
    assert "worker_token" not in again.json()

    kinds = [e["kind"] for e in db_stack.events(created["id"])]
    assert kinds.count("token_issued") == 2  # issued at creation, exchanged at register
    assert kinds.count("registered") == 2
    assert kinds.count("worker_status") == 1  # one heartbeat event, not one per heartbeat


def test_bootstrap_token_is_single_use(db_stack: Stack) -> None:
    created = db_stack.create_instance()
    first = call(db_stack, REGISTER, created["bootstrap_token"], register_body(created["id"]))
    assert first.status_code == 200
    second = call(db_stack, REGISTER, created["bootstrap_token"], register_body(created["id"]))
    assert_error(second, 401, "bootstrap_token_used")


def test_bootstrap_token_cannot_heartbeat(db_stack: Stack) -> None:
    created = db_stack.create_instance()
    response = call(db_stack, HEARTBEAT, created["bootstrap_token"], heartbeat_body(created["id"]))
    assert_error(response, 401, "worker_token_required")


def test_unknown_token_is_401(db_stack: Stack) -> None:
    created = db_stack.create_instance()
    response = call(db_stack, REGISTER, "ivt_boot_guess", register_body(created["id"]))
    assert_error(response, 401, "invalid_token")


def test_token_of_another_instance_is_403(db_stack: Stack) -> None:
    a_id, a_token = registered(db_stack)
    b_id, b_token = registered(db_stack)
    assert_error(
        call(db_stack, HEARTBEAT, a_token, heartbeat_body(b_id)), 403, "token_instance_mismatch"
    )
    assert_error(
        call(db_stack, REGISTER, b_token, register_body(a_id)), 403, "token_instance_mismatch"
    )
    # Neither instance was touched by the other's token.
    assert db_stack.get_instance(a_id)["worker_status"] is None


def test_termination_tells_the_worker_then_revokes_its_tokens(db_stack: Stack) -> None:
    instance_id, token = registered(db_stack)
    response = db_stack.client.delete(f"/api/instances/{instance_id}")
    assert response.status_code == 202
    assert response.json()["status"] == "terminating"
    # Terminating: a register is refused with 409, a heartbeat is told to terminate.
    assert_error(
        call(db_stack, REGISTER, token, register_body(instance_id)), 409, "instance_terminating"
    )
    hb = call(db_stack, HEARTBEAT, token, heartbeat_body(instance_id))
    assert hb.status_code == 200 and hb.json()["desired_state"] == "terminate"
    view = db_stack.wait_status(instance_id, "terminated", timeout=15)
    assert view["terminated_at"] is not None
    # Replaying the token afterwards: 401, with a code the agent understands as "stop".
    time.sleep(0.1)
    assert_error(
        call(db_stack, HEARTBEAT, token, heartbeat_body(instance_id)), 401, "token_revoked"
    )
    assert_error(call(db_stack, REGISTER, token, register_body(instance_id)), 401, "token_revoked")
    # Terminating again is idempotent.
    assert db_stack.client.delete(f"/api/instances/{instance_id}").json()["status"] == "terminated"


def test_body_over_64_kib_is_413_before_it_is_read(db_stack: Stack) -> None:
    big = b'{"pad": "' + b"x" * (70 * 1024) + b'"}'
    response = httpx.post(
        db_stack.api_url + HEARTBEAT,
        content=big,
        headers={"authorization": "Bearer x", "content-type": "application/json"},
        trust_env=False,
    )
    assert_error(response, 413, "body_too_large")

    def chunks():  # no Content-Length: refused once the running total passes the limit
        for _ in range(80):
            yield b"x" * 1024

    response = httpx.post(
        db_stack.api_url + HEARTBEAT,
        content=chunks(),
        headers={"authorization": "Bearer x"},
        trust_env=False,
    )
    assert_error(response, 413, "body_too_large")


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_expired_bootstrap_token_is_401(stack_factory, db: str) -> None:
    stack = stack_factory(db=db, env={"INVENTIV_BOOTSTRAP_TOKEN_TTL_S": "0.5"})
    created = stack.create_instance()
    time.sleep(1.0)
    response = call(stack, REGISTER, created["bootstrap_token"], register_body(created["id"]))
    body = assert_error(response, 401, "bootstrap_token_expired")
    assert "create a new instance" in body["message"]


def test_heartbeats_of_many_workers_are_all_persisted(db_stack: Stack) -> None:
    """Soft state is written in batches: every worker's latest heartbeat must land."""
    workers = [registered(db_stack) for _ in range(6)]
    for seq in (1, 2, 3):
        for instance_id, token in workers:
            hb = heartbeat_body(instance_id, seq=seq, queue_depth=seq)
            assert call(db_stack, HEARTBEAT, token, hb).status_code == 200
    deadline = time.monotonic() + 5
    pending = {i for i, _ in workers}
    while pending and time.monotonic() < deadline:
        for instance_id in list(pending):
            view = db_stack.get_instance(instance_id)
            if view["heartbeat_seq"] == 3 and view["queue_depth"] == 3:
                pending.discard(instance_id)
        time.sleep(0.1)
    assert not pending, f"heartbeats not persisted for {pending}"


def test_a_register_loop_gets_429_with_retry_after(stack: Stack) -> None:
    instance_id, token = registered(stack)  # 1 register
    answers = [call(stack, REGISTER, token, register_body(instance_id)) for _ in range(20)]
    assert [a.status_code for a in answers[:19]] == [200] * 19
    body = assert_error(answers[19], 429, "too_many_registrations")
    assert "Retry-After" in body["message"]
    assert 0 < int(answers[19].headers["retry-after"]) <= 61
    # Heartbeats are not limited by it, and another instance is unaffected.
    assert call(stack, HEARTBEAT, token, heartbeat_body(instance_id)).status_code == 200
    other_id, other_token = registered(stack)
    assert call(stack, REGISTER, other_token, register_body(other_id)).status_code == 200


def test_concurrent_heartbeats_write_one_change_and_one_event(db_stack: Stack) -> None:
    """A retry overlapping the original, or many at once: the change is written once."""
    instance_id, token = registered(db_stack)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(
            base_url=db_stack.api_url,
            headers={"authorization": f"Bearer {token}"},
            timeout=10,
            trust_env=False,
        ) as client:
            answers = await asyncio.gather(
                *(
                    client.post(HEARTBEAT, json=heartbeat_body(instance_id, seq=seq))
                    for seq in range(1, 25)
                )
            )
        return [answer.status_code for answer in answers]

    assert asyncio.run(burst()) == [200] * 24
    assert db_stack.get_instance(instance_id)["status"] == "ready"
    events = db_stack.events(instance_id)
    to_ready = [e for e in events if e["kind"] == "state_changed" and e["to_status"] == "ready"]
    reported = [e for e in events if e["kind"] == "worker_status" and e["reason"] == "ready"]
    assert len(to_ready) == 1, events
    assert len(reported) == 1, events
