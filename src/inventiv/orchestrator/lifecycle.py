"""The instance lifecycle, in one place: states, the transition table, and the one function
that moves an instance from one state to another.

Every transition is a conditional UPDATE (it applies only if the row is still in the state it
was read in), so two orchestrators racing on one PostgreSQL cannot both apply it, and applying
it twice is a no-op. Each applied transition appends an event with its reason.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from inventiv.db.models import Instance, InstanceEvent, utcnow
from inventiv.protocol import DesiredState


class Status(StrEnum):
    PROVISIONING = "provisioning"
    BOOTING = "booting"
    STARTING = "starting"
    READY = "ready"
    UNREACHABLE = "unreachable"
    DRAINING = "draining"
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    PROVISIONING_FAILED = "provisioning_failed"
    STARTUP_FAILED = "startup_failed"


S = Status

# Where each state may go next. Anything not listed is refused.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    S.PROVISIONING: frozenset({S.BOOTING, S.STARTING, S.PROVISIONING_FAILED, S.TERMINATING}),
    S.BOOTING: frozenset({S.STARTING, S.READY, S.STARTUP_FAILED, S.TERMINATING}),
    S.STARTING: frozenset({S.READY, S.UNREACHABLE, S.STARTUP_FAILED, S.DRAINING, S.TERMINATING}),
    S.READY: frozenset({S.STARTING, S.UNREACHABLE, S.DRAINING, S.TERMINATING}),
    S.UNREACHABLE: frozenset({S.READY, S.STARTING, S.DRAINING, S.TERMINATING}),
    S.DRAINING: frozenset({S.READY, S.UNREACHABLE, S.TERMINATING}),
    S.TERMINATING: frozenset({S.TERMINATED}),
    S.TERMINATED: frozenset(),
    S.PROVISIONING_FAILED: frozenset({S.TERMINATING}),
    S.STARTUP_FAILED: frozenset({S.TERMINATING}),
}

# How far an instance is on its way to serving, for people watching a long wait.
PROGRESS: dict[Status, int] = {
    S.PROVISIONING: 10,
    S.BOOTING: 35,
    S.STARTING: 70,
    S.READY: 100,
    S.UNREACHABLE: 100,
    S.DRAINING: 100,
    S.TERMINATING: 50,
    S.TERMINATED: 100,
    S.PROVISIONING_FAILED: 100,
    S.STARTUP_FAILED: 100,
}

FAILED = frozenset({S.PROVISIONING_FAILED, S.STARTUP_FAILED})
# States whose machine should not be running any more.
ENDING = frozenset({S.TERMINATING, S.TERMINATED}) | FAILED
# States in which a worker is expected to heartbeat.
LIVE = frozenset({S.STARTING, S.READY, S.UNREACHABLE, S.DRAINING})
ROUTABLE = frozenset({S.READY})


def desired_state(status: str) -> DesiredState:
    if status == S.DRAINING:
        return DesiredState.DRAIN
    if status in ENDING:
        return DesiredState.TERMINATE
    return DesiredState.RUN


def can_transition(current: str, target: Status) -> bool:
    return target in TRANSITIONS.get(Status(current), frozenset())


async def record_event(
    session: AsyncSession,
    instance_id: str,
    kind: str,
    *,
    reason: str | None = None,
    message: str | None = None,
    from_status: str | None = None,
    to_status: str | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    session.add(
        InstanceEvent(
            instance_id=instance_id,
            at=utcnow(),
            kind=kind,
            reason=reason,
            message=message,
            from_status=from_status,
            to_status=to_status,
            data=data or {},
        )
    )


async def transition(
    session: AsyncSession,
    instance_id: str,
    target: Status,
    *,
    reason: str,
    message: str | None = None,
    only_from: frozenset[Status] | None = None,
    values: dict[str, Any] | None = None,
) -> str | None:
    """Move an instance to `target` if the table allows it from its current state.

    Returns the state it left, or None when nothing changed (not allowed, already there, or
    another writer got there first). The caller commits.
    """
    current = await session.scalar(select(Instance.status).where(Instance.id == instance_id))
    if current is None or current == target or not can_transition(current, target):
        return None
    if only_from is not None and current not in only_from:
        return None
    now = utcnow()
    changes: dict[str, Any] = {"status": target.value, "status_changed_at": now, "updated_at": now}
    changes["desired_state"] = desired_state(target).value
    if target == S.READY:
        changes["ready_at"] = now
        changes["error_code"] = None
        changes["error_message"] = None
    if target == S.TERMINATED:
        changes["terminated_at"] = now
    if target in FAILED:
        changes["error_code"] = reason
        changes["error_message"] = message
    if values:
        changes.update(values)
    result = await session.execute(
        update(Instance)
        .where(Instance.id == instance_id, Instance.status == current)
        .values(**changes)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    await record_event(
        session,
        instance_id,
        "state_changed",
        reason=reason,
        message=message,
        from_status=current,
        to_status=target.value,
    )
    return current
