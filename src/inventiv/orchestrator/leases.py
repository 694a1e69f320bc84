"""Job leases: one row per background job, held by one orchestrator replica at a time.

A replica runs a job's tick only while it holds the job's unexpired lease, so two replicas on
one PostgreSQL never do the same work twice; a replica that dies loses its lease after the TTL.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from inventiv.db.models import JobLease, utcnow


async def acquire(
    sessions: async_sessionmaker[AsyncSession], name: str, holder: str, ttl_s: float
) -> bool:
    """Take or renew the lease `name` for `holder`; True when `holder` now holds it."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl_s)
    async with sessions() as session:
        result = await session.execute(
            update(JobLease)
            .where(
                JobLease.name == name,
                or_(JobLease.holder == holder, JobLease.expires_at < now),
            )
            .values(holder=holder, expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            await session.commit()
            return True
        await session.rollback()
    try:
        async with sessions() as session:
            session.add(JobLease(name=name, holder=holder, expires_at=expires))
            await session.commit()
            return True
    except IntegrityError:
        return False  # another replica holds it


async def release_all(sessions: async_sessionmaker[AsyncSession], holder: str) -> None:
    async with sessions() as session:
        await session.execute(delete(JobLease).where(JobLease.holder == holder))
        await session.commit()
