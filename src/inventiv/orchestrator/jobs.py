"""Background jobs, one per concern, each run under its own lease:

- provisioning: asks the provider for a machine for each `provisioning` instance;
- liveness watchdog: stale heartbeats -> unreachable; unreachable too long -> terminating;
- startup timeout: booting/starting for too long -> startup_failed;
- terminator: asks the provider until the machine is really gone, then terminated;
- reconciliation: the provider's machines against the records (orphans, vanished machines).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from inventiv.config import Settings
from inventiv.db.models import Instance, utcnow
from inventiv.orchestrator import leases
from inventiv.orchestrator.instances import new_instance, revoke_tokens
from inventiv.orchestrator.lifecycle import FAILED, S, record_event, transition
from inventiv.orchestrator.workers import WorkerProtocol, issue_bootstrap_token
from inventiv.providers.base import (
    Machine,
    MachineSpec,
    MachineState,
    Provider,
    ProviderError,
    WorkerBoot,
)

log = logging.getLogger("inventiv.orchestrator.jobs")

Tick = Callable[[], Awaitable[None]]


class Jobs:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        providers: dict[str, Provider],
        workers: WorkerProtocol,
        stack_id: str,
        worker_url: Callable[[], str],
        wake: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.providers = providers
        self.workers = workers
        self.stack_id = stack_id
        self.worker_url = worker_url
        self.wake = wake
        self.holder = f"orch-{secrets.token_hex(6)}"
        self._orphans_seen: dict[str, datetime] = {}
        self._stopped_reported: set[str] = set()
        self._missing: dict[str, int] = {}
        self._watching_since: datetime | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        period = self.settings.job_period_s
        specs: list[tuple[str, Tick, float, bool]] = [
            ("provisioning", self.provision, period, True),
            ("terminator", self.terminate, period, True),
            ("watchdog", self.watchdog, self.settings.watchdog_period_s, False),
            ("startup_timeout", self.startup_timeout, 5.0, False),
            ("reconciliation", self.reconcile, self.settings.reconcile_period_s, False),
        ]
        for name, tick, every, wakeable in specs:
            self._tasks.append(
                asyncio.create_task(self._loop(name, tick, every, wakeable), name=name)
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Hand the jobs over at once: a replica (or this one restarted) need not wait for the
        # leases to expire.
        try:
            await leases.release_all(self.sessions, self.holder)
        except Exception:
            log.exception("could not release job leases; they expire on their own")

    async def _loop(self, name: str, tick: Tick, every: float, wakeable: bool) -> None:
        ttl = max(every * 3, 10.0)
        while True:
            try:
                if await leases.acquire(self.sessions, name, self.holder, ttl):
                    await tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s failed; retrying next period", name)
            if wakeable:
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=every)
                except TimeoutError:
                    pass
                self.wake.clear()
            else:
                await asyncio.sleep(every)

    async def _claim(self, status: S, limit: int = 20) -> list[Instance]:
        """Rows in `status` for this stack. Only the replica holding the job's lease calls it,
        and every change it then makes is a conditional transition, so a row is handled once."""
        async with self.sessions() as session:
            query = (
                select(Instance)
                .where(Instance.stack_id == self.stack_id, Instance.status == status.value)
                .order_by(Instance.created_at)
                .limit(limit)
            )
            return list((await session.scalars(query)).all())

    # -- provisioning -----------------------------------------------------------------------

    async def provision(self) -> None:
        for row in await self._claim(S.PROVISIONING):
            await self._provision_one(row)

    async def _provision_one(self, row: Instance) -> None:
        provider = self.providers.get(row.provider)
        if provider is None:
            await self._fail_provisioning(
                row.id, "provider_unavailable", f"Provider {row.provider!r} is not configured."
            )
            return
        token = await self._bootstrap_token_for(row)
        spec = MachineSpec(
            instance_id=row.id,
            model=row.model,
            zone=row.zone,
            instance_type=row.instance_type,
            image=row.spec.get("image"),
            engine=row.spec.get("engine", "vllm"),
            engine_args=row.spec.get("engine_args"),
            tags=(f"inventiv-stack={self.stack_id}", f"inventiv-instance={row.id}"),
        )
        boot = WorkerBoot(
            control_plane_url=self.worker_url(),
            instance_id=row.id,
            bootstrap_token=token or "",
            model=row.model,
            engine=spec.engine,
        )
        try:
            machine = await provider.create(spec, boot)
        except ProviderError as exc:
            if exc.retryable and not self._expired(row.created_at, "provisioning"):
                log.warning("provisioning %s: %s (will retry)", row.id, exc.message)
                return
            await self._fail_provisioning(row.id, exc.code, exc.message)
            return
        async with self.sessions() as session:
            left = await transition(
                session,
                row.id,
                S.BOOTING,
                reason="provider_created",
                message=f"Provider {row.provider} created machine {machine.provider_id}.",
                only_from=frozenset({S.PROVISIONING}),
                values={
                    "provider_id": machine.provider_id,
                    "zone": machine.zone or row.zone,
                    "instance_type": machine.instance_type or row.instance_type,
                    "address": machine.address,
                },
            )
            await session.commit()
        if left is None:
            # The operator terminated it meanwhile: record the machine so the terminator frees it.
            async with self.sessions() as session:
                await session.execute(
                    update(Instance)
                    .where(Instance.id == row.id, Instance.provider_id.is_(None))
                    .values(provider_id=machine.provider_id)
                )
                await session.commit()
        self.workers.forget_instance(row.id)

    async def _bootstrap_token_for(self, row: Instance) -> str | None:
        """Machines made by Inventiv get a fresh bootstrap token that only the machine sees;
        a manual instance already handed its token to the operator."""
        if row.provider == "manual":
            return None
        async with self.sessions() as session:
            token, _ = await issue_bootstrap_token(
                session, row.id, self.settings, "the machine's boot settings"
            )
            await session.commit()
        return token

    async def _fail_provisioning(self, instance_id: str, code: str, message: str) -> None:
        async with self.sessions() as session:
            await transition(
                session, instance_id, S.PROVISIONING_FAILED, reason=code, message=message
            )
            await session.commit()
        self.workers.forget_instance(instance_id)

    def _expired(self, since: datetime, what: str) -> bool:
        limit = (
            self.settings.provisioning_timeout_s
            if what == "provisioning"
            else self.settings.startup_timeout_s
        )
        return utcnow() - since > timedelta(seconds=limit)

    # -- liveness ---------------------------------------------------------------------------

    async def watchdog(self) -> None:
        """Heartbeats older than the grace -> unreachable (out of routing at once); unreachable
        for longer than INVENTIV_UNREACHABLE_TERMINATE_S -> terminating."""
        await self.workers.batcher.flush()
        now = utcnow()
        grace = timedelta(seconds=self.settings.heartbeat_grace_s)
        # Heartbeats sent while nobody was watching (control plane down or restarting) were
        # lost, not missed: judge only after watching for a whole grace.
        if self._watching_since is None:
            self._watching_since = now
        if now - self._watching_since < grace:
            return
        stale_before = now - grace
        last_seen = func.coalesce(Instance.last_heartbeat_at, Instance.registered_at)
        async with self.sessions() as session:
            stale = (
                await session.execute(
                    select(Instance.id, last_seen).where(
                        Instance.stack_id == self.stack_id,
                        Instance.status.in_([S.READY.value, S.STARTING.value, S.DRAINING.value]),
                        last_seen < stale_before,
                    )
                )
            ).all()
            for instance_id, seen in stale:
                age = (now - seen).total_seconds() if seen else None
                left = await transition(
                    session,
                    instance_id,
                    S.UNREACHABLE,
                    reason="heartbeat_timeout",
                    message=f"No heartbeat for {age:.1f} s (grace "
                    f"{self.settings.heartbeat_grace_s:g} s).",
                )
                if left is not None:
                    self.workers.note_status(instance_id, S.UNREACHABLE.value)
            give_up_before = now - timedelta(seconds=self.settings.unreachable_terminate_s)
            lost = (
                await session.scalars(
                    select(Instance).where(
                        Instance.stack_id == self.stack_id,
                        Instance.status == S.UNREACHABLE.value,
                        Instance.status_changed_at < give_up_before,
                    )
                )
            ).all()
            lost_rows = list(lost)
            for row in lost_rows:
                await transition(
                    session,
                    row.id,
                    S.TERMINATING,
                    reason="unreachable_timeout",
                    message=f"Unreachable for more than "
                    f"{self.settings.unreachable_terminate_s:g} s.",
                )
            await session.commit()
        for row in lost_rows:
            self.workers.forget_instance(row.id)
            if row.replace_on_failure:
                await self._replace(row)
        if lost_rows:
            self.wake.set()

    async def _replace(self, row: Instance) -> None:
        replacement = new_instance(
            row.stack_id,
            provider=row.provider,
            model=row.model,
            zone=row.zone,
            instance_type=row.instance_type,
            spec=row.spec,
            replace_on_failure=True,
            replaces_id=row.id,
        )
        async with self.sessions() as session:
            session.add(replacement)
            await session.flush()
            await record_event(
                session,
                replacement.id,
                "created",
                reason="replacement",
                to_status=S.PROVISIONING.value,
                message=f"Replaces lost instance {row.id}.",
            )
            await record_event(
                session,
                row.id,
                "replaced",
                reason="replacement",
                data={"replacement": replacement.id},
            )
            await session.commit()

    async def startup_timeout(self) -> None:
        cutoff = utcnow() - timedelta(seconds=self.settings.startup_timeout_s)
        async with self.sessions() as session:
            rows = (
                await session.scalars(
                    select(Instance.id).where(
                        Instance.stack_id == self.stack_id,
                        Instance.status.in_([S.BOOTING.value, S.STARTING.value]),
                        Instance.created_at < cutoff,
                    )
                )
            ).all()
            for instance_id in rows:
                await transition(
                    session,
                    instance_id,
                    S.STARTUP_FAILED,
                    reason="startup_timeout",
                    message=f"Not ready {self.settings.startup_timeout_s:g} s after creation "
                    "(INVENTIV_STARTUP_TIMEOUT_S); check the worker's logs.",
                )
            await session.commit()
        for instance_id in rows:
            self.workers.forget_instance(instance_id)
        if rows:
            self.wake.set()

    # -- termination ------------------------------------------------------------------------

    async def terminate(self) -> None:
        for row in await self._claim(S.TERMINATING):
            await self._terminate_one(row)
        async with self.sessions() as session:
            failed = (
                await session.scalars(
                    select(Instance).where(
                        Instance.stack_id == self.stack_id,
                        Instance.status.in_([s.value for s in FAILED]),
                        Instance.terminated_at.is_(None),
                    )
                )
            ).all()
        for row in failed:
            await self._release_failed(row)

    async def _machine_gone(self, row: Instance) -> bool:
        """Ask the provider to delete the machine; True once it no longer exists."""
        provider = self.providers.get(row.provider)
        if provider is None or row.provider_id is None:
            return True
        try:
            await provider.terminate(row.provider_id)
            machine = await provider.get(row.provider_id)
        except ProviderError as exc:
            log.warning("terminating %s: %s", row.id, exc.message)
            return False
        return machine.state in (MachineState.GONE, MachineState.UNKNOWN)

    def _worker_still_being_told(self, row: Instance) -> bool:
        """A live worker gets up to one heartbeat grace to hear `desired_state: terminate`, so
        its agent stops the engine cleanly before its tokens are revoked."""
        if row.registered_at is None:
            return False
        told = row.last_heartbeat_at is not None and row.last_heartbeat_at > row.status_changed_at
        waited = utcnow() - row.status_changed_at
        return not told and waited < timedelta(seconds=self.settings.heartbeat_grace_s)

    async def _terminate_one(self, row: Instance) -> None:
        if self._worker_still_being_told(row):
            return
        if not await self._machine_gone(row):
            return
        now = utcnow()
        async with self.sessions() as session:
            await transition(
                session,
                row.id,
                S.TERMINATED,
                reason="machine_released",
                message="The provider confirmed the machine is gone; tokens revoked.",
            )
            await revoke_tokens(session, row.id, now)
            await session.commit()
        self.workers.forget_instance(row.id)

    async def _release_failed(self, row: Instance) -> None:
        if not await self._machine_gone(row):
            return
        now = utcnow()
        async with self.sessions() as session:
            await session.execute(
                update(Instance)
                .where(Instance.id == row.id, Instance.terminated_at.is_(None))
                .values(terminated_at=now, updated_at=now)
            )
            await revoke_tokens(session, row.id, now)
            await record_event(
                session,
                row.id,
                "machine_released",
                reason=row.error_code,
                message="The failed instance's machine was released; tokens revoked.",
            )
            await session.commit()
        self.workers.forget_instance(row.id)

    # -- reconciliation ---------------------------------------------------------------------

    async def reconcile(self) -> None:
        tag = f"inventiv-stack={self.stack_id}"
        for name, provider in self.providers.items():
            if not provider.can_list:
                continue
            try:
                machines = await provider.list_tagged(tag)
            except ProviderError as exc:
                log.warning("reconciliation with %s skipped: %s", name, exc.message)
                continue
            await self._reconcile_provider(name, provider, machines)

    async def _reconcile_provider(
        self, name: str, provider: Provider, machines: list[Machine]
    ) -> None:
        seen = {m.provider_id: m for m in machines}
        now = utcnow()
        async with self.sessions() as session:
            rows = (
                await session.scalars(
                    select(Instance).where(
                        Instance.stack_id == self.stack_id,
                        Instance.provider == name,
                        Instance.provider_id.is_not(None),
                    )
                )
            ).all()
            known = {r.provider_id: r for r in rows}
            for row in rows:
                if row.status in (S.TERMINATED.value,) or row.terminated_at is not None:
                    continue
                machine = seen.get(row.provider_id)
                if machine is not None and machine.state == MachineState.STOPPED:
                    if row.provider_id not in self._stopped_reported:
                        self._stopped_reported.add(row.provider_id)
                        await record_event(
                            session,
                            row.id,
                            "machine_stopped",
                            reason="provider_reports_stopped",
                            message=f"Machine {row.provider_id} is stopped at {name}; its "
                            "worker cannot heartbeat until it runs again.",
                        )
                    continue
                if machine is not None and machine.state != MachineState.GONE:
                    self._stopped_reported.discard(row.provider_id)
                    self._missing.pop(row.provider_id, None)
                    continue
                # Two signals before dropping anything: missing from two listings in a row, the
                # first of them after the record was last changed (a just-created machine may
                # not be listed yet).
                if now - row.status_changed_at < timedelta(
                    seconds=self.settings.reconcile_period_s
                ):
                    continue
                misses = self._missing[row.provider_id] = self._missing.get(row.provider_id, 0) + 1
                if misses >= 2:
                    self._missing.pop(row.provider_id, None)
                    for target in (S.TERMINATING, S.TERMINATED):
                        await transition(
                            session,
                            row.id,
                            target,
                            reason="deleted_by_provider",
                            message=f"Machine {row.provider_id} no longer exists at {name}.",
                        )
                    await revoke_tokens(session, row.id, now)
                    self.workers.forget_instance(row.id)
            await session.commit()
        for provider_id in seen:
            if provider_id in known:
                self._orphans_seen.pop(provider_id, None)
                continue
            first = self._orphans_seen.setdefault(provider_id, now)
            if now - first < timedelta(seconds=self.settings.orphan_grace_s):
                if first == now:
                    log.warning(
                        "orphan machine %s at %s carries this stack's tag but no record knows "
                        "it; terminating after %g s",
                        provider_id,
                        name,
                        self.settings.orphan_grace_s,
                    )
                continue
            try:
                await provider.terminate(provider_id)
                log.warning("terminated orphan machine %s at %s", provider_id, name)
                self._orphans_seen.pop(provider_id, None)
            except ProviderError as exc:
                log.warning("could not terminate orphan %s: %s", provider_id, exc.message)
