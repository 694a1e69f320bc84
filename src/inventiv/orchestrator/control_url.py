"""The WORKER_CONTROL_PLANE_URL in force, changeable at run time (a tunnel restarted with a
new URL), and its push to every live worker's signed control endpoint.

A worker that misses the push still learns the URL from the next heartbeat answered through any
URL that works, and its agent re-reads WORKER_CONTROL_PLANE_URL_FILE after every failed call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from inventiv.config import Settings, validate_control_plane_url
from inventiv.db.models import Instance, RuntimeSetting, WorkerToken, utcnow
from inventiv.orchestrator.lifecycle import LIVE, record_event
from inventiv.protocol import (
    CONTROL_URL_PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    ControlUrlUpdate,
    sign_control_request,
)

log = logging.getLogger("inventiv.orchestrator.control_url")

SETTING_KEY = "worker_control_plane_url"
REFRESH_S = 5.0
PUSH_TIMEOUT_S = 3.0


class ControlPlaneURL:
    """Callable returning the URL workers should use now (None when none is configured)."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._settings = settings
        self._sessions = sessions
        self._runtime: str | None = None
        self._loaded_at = 0.0

    def __call__(self) -> str | None:
        return self._runtime or self._settings.control_plane_url()

    @property
    def source(self) -> str:
        if self._runtime:
            return "runtime"
        return "settings" if self._settings.control_plane_url() else "unset"

    async def refresh(self) -> None:
        """Pick up a URL set through another replica."""
        async with self._sessions() as session:
            row = await session.get(RuntimeSetting, SETTING_KEY)
        self._runtime = row.value if row else None
        self._loaded_at = time.monotonic()

    async def run_refresher(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except Exception:
                log.exception("could not refresh the control-plane URL")

    async def set(self, url: str) -> int:
        """Store a new URL and push it to live workers; returns how many acknowledged."""
        url = validate_control_plane_url(url)
        async with self._sessions() as session:
            row = await session.get(RuntimeSetting, SETTING_KEY)
            if row is None:
                session.add(RuntimeSetting(key=SETTING_KEY, value=url, updated_at=utcnow()))
            else:
                row.value = url
                row.updated_at = utcnow()
            await session.commit()
        changed = url != self._runtime
        self._runtime = url
        log.info("WORKER_CONTROL_PLANE_URL is now %s", url)
        return await self.push(url) if changed else 0

    async def push(self, url: str) -> int:
        async with self._sessions() as session:
            rows = (
                await session.execute(
                    select(
                        Instance.id, Instance.address, Instance.health_port, WorkerToken.token_hash
                    )
                    .join(WorkerToken, WorkerToken.instance_id == Instance.id)
                    .where(
                        Instance.status.in_([s.value for s in LIVE]),
                        Instance.address.is_not(None),
                        Instance.health_port.is_not(None),
                        WorkerToken.kind == "worker",
                        WorkerToken.revoked_at.is_(None),
                    )
                )
            ).all()
        if not rows:
            return 0
        body = ControlUrlUpdate(control_plane_url=url).model_dump_json().encode()
        async with httpx.AsyncClient(timeout=PUSH_TIMEOUT_S, trust_env=False) as client:
            results = await asyncio.gather(
                *(self._push_one(client, body, *row) for row in rows), return_exceptions=True
            )
        ok = [r for r in results if r is True]
        async with self._sessions() as session:
            for row, result in zip(rows, results, strict=True):
                await record_event(
                    session,
                    row[0],
                    "url_pushed" if result is True else "url_push_failed",
                    message=f"New control-plane URL {url}"
                    + ("" if result is True else f" not delivered: {result}"),
                )
            await session.commit()
        return len(ok)

    async def _push_one(
        self,
        client: httpx.AsyncClient,
        body: bytes,
        instance_id: str,
        address: str,
        health_port: int,
        token_hash: str,
    ) -> bool | str:
        timestamp = f"{time.time():.3f}"
        host = f"[{address}]" if ":" in address else address
        try:
            response = await client.post(
                f"http://{host}:{health_port}{CONTROL_URL_PATH}",
                content=body,
                headers={
                    "content-type": "application/json",
                    TIMESTAMP_HEADER: timestamp,
                    SIGNATURE_HEADER: sign_control_request(token_hash, timestamp, body),
                },
            )
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.status_code == 200:
            return True
        try:
            detail = json.loads(response.content).get("message", "")
        except ValueError:
            detail = ""
        return f"HTTP {response.status_code} {detail}".strip()
