"""The worker protocol service: register and heartbeat, token checks, and the heartbeat batcher.

Heartbeats are the hot path. A heartbeat that changes nothing about the lifecycle only updates
soft state (last seen, metrics), so it goes into an in-memory batch flushed every
INVENTIV_HEARTBEAT_FLUSH_S in one executemany; only lifecycle changes (starting -> ready,
unreachable -> ready, ...) and changes of the status the worker reports are written
synchronously with their event. Token and instance lookups come from WorkerCache, so a steady
heartbeat touches no database at all.

The cache only says that a change *may* be new; the database decides. Both writes are
conditional (the state it was read in, a reported status that differs), so a cache that lags
behind (its periodic reload, another replica) costs a query, never a second event.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from inventiv.config import Settings
from inventiv.db.models import Instance, WorkerToken, utcnow
from inventiv.errors import HTTPError
from inventiv.orchestrator.lifecycle import (
    ENDING,
    S,
    Status,
    desired_state,
    record_event,
    transition,
)
from inventiv.orchestrator.worker_cache import CachedInstance, WorkerCache
from inventiv.protocol import (
    HeartbeatRequest,
    HeartbeatResponse,
    RegisterRequest,
    RegisterResponse,
    WorkerStatus,
    hash_token,
)

log = logging.getLogger("inventiv.orchestrator.workers")

REGISTER_LIMIT = 20
REGISTER_WINDOW_S = 60.0
BOOTSTRAP = "bootstrap"
WORKER = "worker"


def new_token(kind: str) -> str:
    return f"ivt_{kind[:4]}_{secrets.token_urlsafe(32)}"


def instance_not_found(instance_id: str) -> HTTPError:
    return HTTPError(
        404,
        "instance_not_found",
        f"Instance {instance_id} does not exist on this control plane; check INSTANCE_ID or "
        "create the instance again.",
    )


def unauthorized(code: str, message: str) -> HTTPError:
    return HTTPError(401, code, message, [(b"www-authenticate", b"Bearer")])


class HeartbeatBatcher:
    """Keeps the latest heartbeat per instance and writes them all at once."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], period_s: float) -> None:
        self._sessions = sessions
        self._period_s = period_s
        self._pending: dict[str, tuple[datetime, HeartbeatRequest]] = {}
        self._lock = asyncio.Lock()
        self.flushed = 0

    def put(self, instance_id: str, at: datetime, hb: HeartbeatRequest) -> None:
        # Only the latest heartbeat per instance is kept; it is turned into row values at flush
        # time, so a worker heartbeating several times per flush is serialised once.
        self._pending[instance_id] = (at, hb)

    async def flush(self) -> int:
        """Write pending heartbeats; safe to call from several tasks (the watchdog flushes
        before it judges staleness)."""
        async with self._lock:
            if not self._pending:
                return 0
            pending, self._pending = self._pending, {}
            batch = [row_values(i, at, hb) for i, (at, hb) in pending.items()]
            table = Instance.__table__
            statement = (
                update(table)
                .where(table.c.id == bindparam("b_id"))
                # A terminating instance still records heartbeats: the terminator waits for one
                # to know the worker heard `terminate`. (`!=`, not an IN list: executemany
                # cannot take an "expanding" parameter.)
                .where(table.c.status != S.TERMINATED.value)
                .values(
                    last_heartbeat_at=bindparam("last_heartbeat_at"),
                    heartbeat_seq=bindparam("heartbeat_seq"),
                    queue_depth=bindparam("queue_depth"),
                    requests_running=bindparam("requests_running"),
                    metrics=bindparam("metrics"),
                    updated_at=bindparam("updated_at"),
                )
            )
            async with self._sessions() as session:
                connection = await session.connection()
                await connection.execute(statement, batch)
                await session.commit()
            self.flushed += len(batch)
            return len(batch)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            try:
                await self.flush()
            except Exception:  # a flush failure must not kill the loop; the next one retries
                log.exception("heartbeat flush failed")


def row_values(instance_id: str, at: datetime, hb: HeartbeatRequest) -> dict[str, Any]:
    return {
        "b_id": instance_id,
        "last_heartbeat_at": at,
        "heartbeat_seq": hb.seq,
        "queue_depth": hb.queue_depth,
        "requests_running": hb.requests_running,
        "metrics": soft_metrics(hb),
        "updated_at": at,
    }


def soft_metrics(hb: HeartbeatRequest) -> dict[str, Any]:
    return {
        "gpus": [g.model_dump(exclude_none=True) for g in hb.gpus],
        "system": hb.system.model_dump(exclude_none=True) if hb.system else {},
        "model_id": hb.model_id,
        "simulated": hb.simulated,
        "error": hb.error,
    }


class WorkerProtocol:
    """Register and heartbeat, as the orchestrator serves them."""

    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        control_plane_url: Any,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._control_plane_url = control_plane_url
        self.cache = WorkerCache(sessions)
        self._answers: dict[tuple[str, str | None], bytes] = {}
        self._registers: dict[str, list[float]] = {}
        # Instances whose lifecycle change is being written right now.
        self._changing: set[str] = set()
        self.batcher = HeartbeatBatcher(sessions, settings.heartbeat_flush_s)

    # -- cache ----------------------------------------------------------------------------

    def forget_instance(self, instance_id: str) -> None:
        self.cache.forget(instance_id)

    def note_status(self, instance_id: str, status: str) -> None:
        self.cache.note_status(instance_id, status)

    # -- register ---------------------------------------------------------------------------

    def _limit_registers(self, instance_id: str) -> None:
        """A worker re-registering in a loop (crashing agent, bad state) gets 429 rather than
        an event row per attempt."""
        now = time.monotonic()
        recent = [t for t in self._registers.get(instance_id, []) if now - t < REGISTER_WINDOW_S]
        if len(recent) >= REGISTER_LIMIT:
            retry = int(REGISTER_WINDOW_S - (now - recent[0])) + 1
            raise HTTPError(
                429,
                "too_many_registrations",
                f"Instance {instance_id} registered {len(recent)} times in the last "
                f"{REGISTER_WINDOW_S:g} s; wait {retry} s (Retry-After) and check why the agent "
                "keeps restarting.",
                [(b"retry-after", str(retry).encode())],
            )
        recent.append(now)
        self._registers[instance_id] = recent

    async def register(self, token: str, req: RegisterRequest, client: str | None) -> bytes:
        instance_id = str(req.instance_id)
        token_hash = hash_token(token)
        now = utcnow()
        async with self._sessions() as session:
            instance = await session.get(Instance, instance_id)
            if instance is None:
                raise instance_not_found(instance_id)
            record = await session.get(WorkerToken, token_hash)
            self._check_token(record, token_hash, instance_id)
            assert record is not None
            self._limit_registers(instance_id)  # after auth: nobody else can use up the budget
            if instance.status in ENDING:
                raise HTTPError(
                    409,
                    "instance_terminating",
                    f"Instance {instance_id} is {instance.status}; it will not be registered. "
                    "Stop this worker.",
                )
            issued: str | None = None
            if record.kind == BOOTSTRAP:
                issued = await self._exchange_bootstrap(session, record, now)
            await self._apply_registration(session, instance, req, client, now, issued)
            await session.commit()
        self.forget_instance(instance_id)
        return (
            RegisterResponse(
                worker_token=issued,
                heartbeat_interval_s=self._settings.heartbeat_interval_s,
                status=instance.status,
            )
            .model_dump_json(exclude_none=True)
            .encode()
        )

    def _check_token(self, record: WorkerToken | None, token_hash: str, instance_id: str) -> None:
        if record is None or not hmac.compare_digest(record.token_hash, token_hash):
            raise unauthorized(
                "invalid_token",
                "The bearer token is not known to this control plane. Use the bootstrap token "
                "given when the instance was created, or the worker token it was exchanged for.",
            )
        if record.instance_id != instance_id:
            raise HTTPError(
                403,
                "token_instance_mismatch",
                f"This token belongs to another instance, not {instance_id}; each worker "
                "must use its own instance's token.",
            )
        if record.revoked_at is not None:
            raise unauthorized(
                "token_revoked",
                f"Instance {instance_id} was terminated and its tokens were revoked; stop this "
                "worker (create a new instance to serve again).",
            )

    async def _exchange_bootstrap(
        self, session: AsyncSession, record: WorkerToken, now: datetime
    ) -> str:
        if record.used_at is not None:
            raise unauthorized(
                "bootstrap_token_used",
                "This bootstrap token was already exchanged for a worker token; register with "
                "the worker token the agent stored, or create a new instance.",
            )
        if record.expires_at is not None and record.expires_at <= now:
            raise unauthorized(
                "bootstrap_token_expired",
                "This bootstrap token expired before the worker registered; create a new "
                "instance (or raise INVENTIV_BOOTSTRAP_TOKEN_TTL_S for slow boots).",
            )
        # Single use even against a concurrent register: only one UPDATE can see used_at NULL.
        result = await session.execute(
            update(WorkerToken)
            .where(WorkerToken.token_hash == record.token_hash, WorkerToken.used_at.is_(None))
            .values(used_at=now)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise unauthorized(
                "bootstrap_token_used",
                "This bootstrap token was already exchanged for a worker token.",
            )
        await session.execute(
            update(WorkerToken)
            .where(
                WorkerToken.instance_id == record.instance_id,
                WorkerToken.kind == WORKER,
                WorkerToken.revoked_at.is_(None),
            )
            .values(revoked_at=now)
            .execution_options(synchronize_session=False)
        )
        worker_token = new_token(WORKER)
        session.add(
            WorkerToken(
                token_hash=hash_token(worker_token),
                instance_id=record.instance_id,
                kind=WORKER,
                created_at=now,
            )
        )
        await record_event(
            session,
            record.instance_id,
            "token_issued",
            reason="bootstrap_exchanged",
            message="The bootstrap token was exchanged for a worker token.",
        )
        return worker_token

    async def _apply_registration(
        self,
        session: AsyncSession,
        instance: Instance,
        req: RegisterRequest,
        client: str | None,
        now: datetime,
        issued: str | None,
    ) -> None:
        address = req.address or client
        await session.execute(
            update(Instance)
            .where(Instance.id == instance.id)
            .values(
                worker_id=str(req.worker_id),
                agent_version=req.agent_version,
                address=address,
                engine_port=req.engine_port,
                health_port=req.health_port,
                gpus=[g.model_dump(exclude_none=True) for g in req.gpus],
                host=req.host.model_dump(exclude_none=True) if req.host else {},
                registered_at=now,
                last_heartbeat_at=now,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        await record_event(
            session,
            instance.id,
            "registered",
            reason="bootstrap" if issued else "reregister",
            message=f"Worker {req.worker_id} (agent {req.agent_version}) registered from "
            f"{address or 'an unknown address'}.",
            data={"worker_id": str(req.worker_id), "address": address, "gpus": len(req.gpus)},
        )
        left = await transition(
            session,
            instance.id,
            S.STARTING,
            reason="registered",
            message="The worker registered; its engine is loading.",
        )
        if left is not None:
            instance.status = S.STARTING

    # -- heartbeat --------------------------------------------------------------------------

    async def heartbeat(self, token: str, req: HeartbeatRequest) -> bytes:
        instance_id = str(req.instance_id)
        instance = await self.cache.instance(instance_id)
        if instance is None:
            raise instance_not_found(instance_id)
        record = await self.cache.token(hash_token(token))
        if record is None:
            raise unauthorized(
                "invalid_token",
                "The bearer token is not known to this control plane; heartbeats need the "
                "worker token returned by register.",
            )
        if record.instance_id != instance_id:
            raise HTTPError(
                403,
                "token_instance_mismatch",
                f"This token belongs to another instance, not {instance_id}.",
            )
        if record.revoked:
            raise unauthorized(
                "token_revoked",
                f"Instance {instance_id} was terminated and its tokens were revoked; stop this "
                "worker.",
            )
        if record.kind != WORKER:
            raise unauthorized(
                "worker_token_required",
                "Heartbeats need the worker token returned by register, not the bootstrap "
                "token; call register first.",
            )
        now = utcnow()
        target = lifecycle_target(instance.status, req.status)
        changes = target is not None or req.status.value != instance.worker_status
        # One write per change: heartbeats that arrive while it is being written (a retry, or a
        # whole fleet coming back at once) do not queue the same write behind it again; the
        # next heartbeat after it sees the new state and re-checks.
        if changes and instance_id not in self._changing:
            self._changing.add(instance_id)
            try:
                await self._apply_heartbeat_change(instance_id, instance, target, req, now)
            finally:
                self._changing.discard(instance_id)
        self.batcher.put(instance_id, now, req)
        return self._heartbeat_answer(instance.status)

    def _heartbeat_answer(self, status: str) -> bytes:
        """Answers depend only on the state and the URL in force, so they are encoded once."""
        key = (status, self._control_plane_url())
        answer = self._answers.get(key)
        if answer is None:
            answer = (
                HeartbeatResponse(
                    heartbeat_interval_s=self._settings.heartbeat_interval_s,
                    desired_state=desired_state(status),
                    control_plane_url=key[1],
                )
                .model_dump_json(exclude_none=True)
                .encode()
            )
            if len(self._answers) > 64:
                self._answers.clear()
            self._answers[key] = answer
        return answer

    async def _apply_heartbeat_change(
        self,
        instance_id: str,
        instance: CachedInstance,
        target: Status | None,
        req: HeartbeatRequest,
        now: datetime,
    ) -> None:
        """The rare heartbeat that changes something: written now, with its event.

        `worker_status` is written here only, never by the batch, so the column is the last
        status an event was recorded for and the conditional UPDATE below lets exactly one
        heartbeat record each change.
        """
        async with self._sessions() as session:
            if target is not None:
                left = await transition(
                    session,
                    instance_id,
                    target,
                    reason=f"worker_{req.status.value}",
                    message=heartbeat_message(instance.status, req),
                    values={"last_heartbeat_at": now},
                )
                if left is not None:
                    instance.status = target.value
            reported = req.status.value
            result = await session.execute(
                update(Instance)
                .where(
                    Instance.id == instance_id,
                    Instance.worker_status.is_distinct_from(reported),
                )
                .values(worker_status=reported, last_heartbeat_at=now)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                await record_event(
                    session,
                    instance_id,
                    "worker_status",
                    reason=reported,
                    message=req.error or f"The worker reports {reported}.",
                    data={"seq": req.seq},
                )
            await session.commit()
        # Marks the entry as changed by this process, so a reload that read the row before this
        # commit does not bring the old values back.
        self.cache.note_status(instance_id, instance.status, worker_status=reported)


def lifecycle_target(current: str, reported: WorkerStatus) -> Status | None:
    """The state a heartbeat moves an instance to, or None if it changes nothing."""
    if reported == WorkerStatus.READY and current in (S.BOOTING, S.STARTING, S.UNREACHABLE):
        return S.READY
    if reported == WorkerStatus.STARTING and current in (S.BOOTING, S.READY, S.UNREACHABLE):
        return S.STARTING
    if reported in (WorkerStatus.DRAINING, WorkerStatus.ERROR) and current == S.UNREACHABLE:
        return S.STARTING
    return None


def heartbeat_message(current: str, req: HeartbeatRequest) -> str:
    if current == S.UNREACHABLE:
        return f"Heartbeats resumed (seq {req.seq}); the worker reports {req.status.value}."
    if req.status == WorkerStatus.READY:
        return "The worker reports its engine ready."
    return f"The worker reports {req.status.value}."


async def issue_bootstrap_token(
    session: AsyncSession, instance_id: str, settings: Settings, given_to: str
) -> tuple[str, datetime]:
    """Mint an instance's single-use bootstrap token; only its hash is stored."""
    token = new_token(BOOTSTRAP)
    now = utcnow()
    expires_at = now + timedelta(seconds=settings.bootstrap_token_ttl_s)
    session.add(
        WorkerToken(
            token_hash=hash_token(token),
            instance_id=instance_id,
            kind=BOOTSTRAP,
            created_at=now,
            expires_at=expires_at,
        )
    )
    await record_event(
        session,
        instance_id,
        "token_issued",
        reason="bootstrap",
        message=f"Bootstrap token issued to {given_to}; single use, expires "
        f"{expires_at.isoformat(timespec='seconds')}.",
    )
    return token, expires_at
