"""The in-memory view of worker tokens and instance states that lets a heartbeat skip the
database.

The whole view is reloaded in two queries every REFRESH_S (so entries never expire one by one
in a burst of lookups), a miss falls back to one lookup, and this process updates or drops an
entry the moment it changes it. Changes made by another orchestrator replica show up at the next
reload: revocation and state changes lag by at most REFRESH_S across replicas.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from inventiv.db.models import Instance, WorkerToken, utcnow

log = logging.getLogger("inventiv.orchestrator.worker_cache")

REFRESH_S = 2.0
# Terminated instances stay in the view this long, so a late heartbeat hears `token_revoked`.
KEEP_TERMINATED = timedelta(hours=1)


@dataclass(slots=True)
class CachedToken:
    instance_id: str
    kind: str
    revoked: bool


@dataclass(slots=True)
class CachedInstance:
    status: str
    worker_status: str | None


class WorkerCache:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._instances: dict[str, CachedInstance] = {}
        self._tokens: dict[str, CachedToken] = {}
        self._dirty: set[str] = set()

    async def instance(self, instance_id: str) -> CachedInstance | None:
        cached = self._instances.get(instance_id)
        if cached is not None:
            return cached
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(Instance.status, Instance.worker_status).where(
                        Instance.id == instance_id
                    )
                )
            ).first()
        if row is None:
            return None
        cached = CachedInstance(status=row[0], worker_status=row[1])
        self._instances[instance_id] = cached
        return cached

    async def token(self, token_hash: str) -> CachedToken | None:
        cached = self._tokens.get(token_hash)
        if cached is not None:
            return cached
        async with self._sessions() as session:
            row = await session.get(WorkerToken, token_hash)
        if row is None:
            return None
        cached = CachedToken(row.instance_id, row.kind, row.revoked_at is not None)
        if row.kind == "worker":  # bootstrap tokens are single use: always checked in the database
            self._tokens[token_hash] = cached
        return cached

    def forget(self, instance_id: str) -> None:
        """Drop what this process knows about an instance after changing it in the database."""
        self._dirty.add(instance_id)
        self._instances.pop(instance_id, None)
        for key in [k for k, v in self._tokens.items() if v.instance_id == instance_id]:
            del self._tokens[key]

    def note_status(
        self, instance_id: str, status: str, *, worker_status: str | None = None
    ) -> None:
        self._dirty.add(instance_id)
        cached = self._instances.get(instance_id)
        if cached is not None:
            cached.status = status
            if worker_status is not None:
                cached.worker_status = worker_status

    async def refresh(self) -> None:
        self._dirty = set()
        since = utcnow() - KEEP_TERMINATED
        current = or_(Instance.terminated_at.is_(None), Instance.terminated_at > since)
        async with self._sessions() as session:
            instances = (
                await session.execute(
                    select(Instance.id, Instance.status, Instance.worker_status).where(current)
                )
            ).all()
            tokens = (
                await session.execute(
                    select(WorkerToken.token_hash, WorkerToken.instance_id, WorkerToken.revoked_at)
                    .join(Instance, Instance.id == WorkerToken.instance_id)
                    .where(WorkerToken.kind == "worker", current)
                )
            ).all()
        fresh_instances = {i: CachedInstance(status, ws) for i, status, ws in instances}
        fresh_tokens = {h: CachedToken(i, "worker", r is not None) for h, i, r in tokens}
        # Keep what this process changed while the queries ran: it is newer than the snapshot.
        for instance_id in self._dirty:
            fresh_instances.pop(instance_id, None)
            if instance_id in self._instances:
                fresh_instances[instance_id] = self._instances[instance_id]
        for key, value in list(fresh_tokens.items()):
            if value.instance_id in self._dirty:
                del fresh_tokens[key]
        self._instances = fresh_instances
        self._tokens = fresh_tokens

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("worker cache refresh failed; serving the previous view")
            await asyncio.sleep(REFRESH_S)
