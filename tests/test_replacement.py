"""An instance lost for good is terminated, and replaced when it asked for it."""

from __future__ import annotations

import time

import psutil

from tests.conftest import StackFactory

FAST = {
    "INVENTIV_HEARTBEAT_INTERVAL_S": "1",
    "INVENTIV_HEARTBEAT_GRACE_S": "3",
    "INVENTIV_UNREACHABLE_TERMINATE_S": "2",
}


def kill_agent(instance_id: str) -> None:
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("INSTANCE_ID") == instance_id and env.get("INVENTIV_LOCAL_ROLE") == "agent":
            proc.kill()
            return
    raise AssertionError(f"no agent process for {instance_id}")


def test_lost_instance_is_terminated_and_replaced(stack_factory: StackFactory) -> None:
    stack = stack_factory(env=FAST)
    lost = stack.create_instance(provider="local", model="echo", replace_on_failure=True)
    kept = stack.create_instance(provider="local", model="echo")
    stack.wait_status(lost["id"], "ready", timeout=30)
    stack.wait_status(kept["id"], "ready", timeout=30)

    kill_agent(lost["id"])
    kill_agent(kept["id"])
    stack.wait_status(lost["id"], "unreachable", timeout=15)
    stack.wait_status(lost["id"], "terminated", timeout=30)
    reasons = [e["reason"] for e in stack.events(lost["id"]) if e["kind"] == "state_changed"]
    assert "heartbeat_timeout" in reasons and "unreachable_timeout" in reasons

    deadline = time.monotonic() + 30
    replacement = None
    while time.monotonic() < deadline and replacement is None:
        items = stack.client.get("/api/instances").json()["items"]
        replacement = next((i for i in items if i["replaces_id"] == lost["id"]), None)
        time.sleep(0.2)
    assert replacement is not None, "no replacement was created"
    stack.wait_status(replacement["id"], "ready", timeout=30)
    # The one that did not ask for it is terminated and not replaced.
    stack.wait_status(kept["id"], "terminated", timeout=30)
    items = stack.client.get("/api/instances").json()["items"]
    assert not [i for i in items if i["replaces_id"] == kept["id"]]
    stack.client.delete(f"/api/instances/{replacement['id']}")
    stack.wait_status(replacement["id"], "terminated", timeout=30)
