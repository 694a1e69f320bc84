"""A control-plane outage is not the workers' fault: heartbeats lost while nobody listened must
not take every worker out of routing the moment the orchestrator is back."""

from __future__ import annotations

import time

from tests.conftest import StackFactory
from tests.test_worker_protocol import HEARTBEAT, call, heartbeat_body, registered


def test_orchestrator_restart_gives_workers_a_grace(stack_factory: StackFactory) -> None:
    stack = stack_factory(env={"INVENTIV_HEARTBEAT_GRACE_S": "3"})
    instance_id, token = registered(stack)
    assert call(stack, HEARTBEAT, token, heartbeat_body(instance_id, seq=1)).status_code == 200
    stack.wait_status(instance_id, "ready", timeout=5)
    stack.stop_orchestrator()
    time.sleep(4)  # longer than the grace: every last heartbeat is now "stale"
    stack.start_orchestrator()
    time.sleep(2)  # several watchdog passes, still within a grace of watching
    assert stack.get_instance(instance_id)["status"] == "ready"
    assert call(stack, HEARTBEAT, token, heartbeat_body(instance_id, seq=2)).status_code == 200
    time.sleep(2)
    assert stack.get_instance(instance_id)["status"] == "ready"
    assert not [e for e in stack.events(instance_id) if e["to_status"] == "unreachable"]
    # A worker that stays silent is still found out, one grace after the restart.
    stack.wait_status(instance_id, "unreachable", timeout=10)
