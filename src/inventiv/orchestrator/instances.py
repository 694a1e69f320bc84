"""The operator's view of instances: create (with a one-time bootstrap token), list, inspect,
read events, terminate."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from inventiv.config import Settings
from inventiv.db.models import Instance, InstanceEvent, WorkerToken, utcnow
from inventiv.errors import HTTPError
from inventiv.orchestrator.lifecycle import PROGRESS, S, Status, record_event, transition
from inventiv.orchestrator.workers import issue_bootstrap_token
from inventiv.providers.base import WorkerBoot
from inventiv.schemas import (
    CreatedInstance,
    CreateInstanceRequest,
    EventList,
    EventView,
    InstanceList,
    InstanceView,
)


def instance_view(row: Instance) -> InstanceView:
    return InstanceView(
        id=row.id,
        provider=row.provider,
        provider_id=row.provider_id,
        zone=row.zone,
        instance_type=row.instance_type,
        model=row.model,
        status=row.status,
        progress=PROGRESS[Status(row.status)],
        desired_state=row.desired_state,
        error_code=row.error_code,
        error_message=row.error_message,
        worker_id=row.worker_id,
        agent_version=row.agent_version,
        address=row.address,
        engine_port=row.engine_port,
        health_port=row.health_port,
        gpus=row.gpus,
        worker_status=row.worker_status,
        queue_depth=row.queue_depth,
        requests_running=row.requests_running,
        metrics=row.metrics,
        last_heartbeat_at=row.last_heartbeat_at,
        heartbeat_seq=row.heartbeat_seq,
        created_at=row.created_at,
        status_changed_at=row.status_changed_at,
        ready_at=row.ready_at,
        terminated_at=row.terminated_at,
        replace_on_failure=row.replace_on_failure,
        replaces_id=row.replaces_id,
    )


def new_instance(
    stack_id: str,
    *,
    provider: str,
    model: str,
    zone: str | None,
    instance_type: str | None,
    spec: dict[str, Any],
    replace_on_failure: bool,
    replaces_id: str | None = None,
) -> Instance:
    """A fresh record in `provisioning`; the provisioning job takes it from there."""
    now = utcnow()
    return Instance(
        id=str(uuid.uuid4()),
        stack_id=stack_id,
        provider=provider,
        zone=zone,
        instance_type=instance_type,
        model=model,
        spec=spec,
        replace_on_failure=replace_on_failure,
        replaces_id=replaces_id,
        status=S.PROVISIONING.value,
        status_changed_at=now,
        desired_state="run",
        gpus=[],
        host={},
        metrics={},
        created_at=now,
        updated_at=now,
    )


def not_found(instance_id: str) -> HTTPError:
    return HTTPError(
        404,
        "instance_not_found",
        f"No instance with id {instance_id}; list instances with GET /api/instances.",
    )


def parse_instance_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise HTTPError(
            422,
            "invalid_field",
            f"Field 'instance_id': {raw!r} is not a UUID; instance ids look like 3f2b8c1e-....",
        ) from None


class InstanceService:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        stack_id: str,
        control_plane_url: object,
        wake: asyncio.Event,
        providers: set[str],
        forget: Callable[[str], None],
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._stack_id = stack_id
        self._control_plane_url = control_plane_url
        self._wake = wake
        self._providers = providers
        self._forget = forget

    async def create(self, req: CreateInstanceRequest) -> CreatedInstance:
        if req.provider not in self._providers:
            raise HTTPError(
                422,
                "provider_unavailable",
                f"Field 'provider': {req.provider!r} is not configured on this control plane "
                f"(available: {', '.join(sorted(self._providers))}). For scaleway, set "
                "SCW_ACCESS_KEY, SCW_SECRET_KEY and SCW_DEFAULT_PROJECT_ID.",
            )
        engine = req.engine or ("echo" if req.model == "echo" else "vllm")
        row = new_instance(
            self._stack_id,
            provider=req.provider,
            model=req.model,
            zone=req.zone,
            instance_type=req.instance_type,
            spec={"engine": engine, "image": req.image, "engine_args": req.engine_args},
            replace_on_failure=req.replace_on_failure,
        )
        instance_id = row.id
        async with self._sessions() as session:
            session.add(row)
            await session.flush()
            await record_event(
                session,
                instance_id,
                "created",
                reason="operator_request",
                to_status=S.PROVISIONING.value,
                message=f"Instance created on provider {req.provider} for model {req.model}.",
            )
            token, expires_at = None, None
            if req.provider == "manual":  # others get theirs in the machine's boot settings
                token, expires_at = await issue_bootstrap_token(
                    session, instance_id, self._settings, "the operator (create answer)"
                )
            await session.commit()
        self._wake.set()
        view = instance_view(row)
        if token is None:
            return CreatedInstance(**view.model_dump(), agent_command=None)
        url, warnings = self.worker_url()
        boot = WorkerBoot(
            control_plane_url=url,
            instance_id=instance_id,
            bootstrap_token=token,
            model=req.model,
            engine=engine,
        )
        return CreatedInstance(
            **view.model_dump(),
            bootstrap_token=token,
            bootstrap_token_expires_at=expires_at,
            agent_env=boot.agent_env(),
            agent_command="inventiv worker",
            warnings=warnings,
        )

    def worker_url(self) -> tuple[str, list[str]]:
        url = self._control_plane_url()  # type: ignore[operator]
        if url:
            return url, []
        return self._settings.api_local_url, [
            "WORKER_CONTROL_PLANE_URL is not set, so agent_env points at "
            f"{self._settings.api_local_url}, which only a worker on this machine can reach. "
            "Run `make tunnel` (or set WORKER_CONTROL_PLANE_URL) for remote workers."
        ]

    async def list(
        self, status: str | None = None, include_terminated: bool = True
    ) -> InstanceList:
        async with self._sessions() as session:
            query = select(Instance).order_by(Instance.created_at.desc())
            if status is not None:
                query = query.where(Instance.status == status)
            elif not include_terminated:
                query = query.where(Instance.status != S.TERMINATED.value)
            rows = (await session.scalars(query)).all()
        items = [instance_view(r) for r in rows]
        return InstanceList(items=items, count=len(items))

    async def get(self, instance_id: str) -> InstanceView:
        instance_id = parse_instance_id(instance_id)
        async with self._sessions() as session:
            row = await session.get(Instance, instance_id)
        if row is None:
            raise not_found(instance_id)
        return instance_view(row)

    async def events(self, instance_id: str, limit: int = 200) -> EventList:
        instance_id = parse_instance_id(instance_id)
        async with self._sessions() as session:
            if await session.get(Instance, instance_id) is None:
                raise not_found(instance_id)
            rows = (
                await session.scalars(
                    select(InstanceEvent)
                    .where(InstanceEvent.instance_id == instance_id)
                    .order_by(InstanceEvent.id.desc())
                    .limit(limit)
                )
            ).all()
        return EventList(
            items=[
                EventView(
                    id=r.id,
                    at=r.at,
                    kind=r.kind,
                    from_status=r.from_status,
                    to_status=r.to_status,
                    reason=r.reason,
                    message=r.message,
                    data=r.data,
                )
                for r in reversed(rows)
            ]
        )

    async def terminate(self, instance_id: str) -> InstanceView:
        """Ask for termination; the terminator job releases the machine and revokes tokens.

        Idempotent: terminating a terminating or terminated instance changes nothing.
        """
        instance_id = parse_instance_id(instance_id)
        async with self._sessions() as session:
            row = await session.get(Instance, instance_id)
            if row is None:
                raise not_found(instance_id)
            await transition(
                session,
                instance_id,
                S.TERMINATING,
                reason="operator_request",
                message="Termination requested by the operator.",
            )
            await session.commit()
        self._forget(instance_id)  # the next heartbeat must hear `terminate`, not a cached `run`
        self._wake.set()
        return await self.get(instance_id)


async def revoke_tokens(session: AsyncSession, instance_id: str, now: datetime) -> None:
    await session.execute(
        update(WorkerToken)
        .where(WorkerToken.instance_id == instance_id, WorkerToken.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
