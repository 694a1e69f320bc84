"""Reconciliation must not take a machine it cannot see for a machine that is gone."""

from __future__ import annotations

import time

from tests.conftest import StackFactory
from tests.test_worker_protocol import HEARTBEAT, call, heartbeat_body, registered


def test_manual_instances_survive_reconciliation(stack_factory: StackFactory) -> None:
    stack = stack_factory(env={"INVENTIV_RECONCILE_PERIOD_S": "0.2"})
    instance_id, token = registered(stack)
    idle = stack.create_instance()  # booting, never registers
    deadline = time.monotonic() + 3
    seq = 0
    while time.monotonic() < deadline:  # a dozen reconciliation passes
        seq += 1
        assert (
            call(stack, HEARTBEAT, token, heartbeat_body(instance_id, seq=seq)).status_code == 200
        )
        time.sleep(0.25)
    assert stack.get_instance(instance_id)["status"] == "ready"
    assert stack.get_instance(idle["id"])["status"] == "booting"
    reasons = {e["reason"] for e in stack.events(instance_id) + stack.events(idle["id"])}
    assert "deleted_by_provider" not in reasons
