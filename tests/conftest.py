"""Shared fixtures: real control-plane stacks (orchestrator + API processes on loopback) on
SQLite or PostgreSQL.

PostgreSQL comes from INVENTIV_TEST_PG_URL (default: postgres:postgres on 127.0.0.1:5432);
each stack gets a fresh database. Without a server the PostgreSQL cases are skipped locally and
fail under CI, where `.ci/run` starts one.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from inventiv.stack import port_free

PG_URL = os.environ.get(
    "INVENTIV_TEST_PG_URL", "postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/postgres"
)
ADMIN_TOKEN = "test-admin-token-" + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_used_offsets: set[int] = set()


def free_port_offset() -> int:
    """A PORT_OFFSET whose API (8003+o) and orchestrator (8001+o) ports are both free."""
    for _ in range(200):
        offset = random.randrange(12000, 50000, 10)
        if offset in _used_offsets:
            continue
        if port_free(8001 + offset) and port_free(8003 + offset):
            _used_offsets.add(offset)
            return offset
    raise RuntimeError("no free PORT_OFFSET found")


async def _pg_admin(sql: str) -> None:
    import asyncpg

    dsn = PG_URL.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def postgres_database() -> str:
    """Create an empty database and return its SQLAlchemy URL."""
    name = f"inventiv_test_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # any failure means no server here
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not available ({exc}); start it to run these cases")
    base, _, _ = PG_URL.rpartition("/")
    return f"{base}/{name}"


def wait_http(url: str, timeout: float = 30.0, predicate: Any = None) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2.0, trust_env=False)
            if predicate is None or predicate(response):
                return response
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer in {timeout} s ({last})")


class Stack:
    """One control plane: an orchestrator and an API process, started with the CLI."""

    def __init__(self, tmp: Path, database_url: str | None, env: dict[str, str] | None) -> None:
        self.port_offset = free_port_offset()
        self.data_dir = tmp / f"stack-{self.port_offset}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.admin_token = ADMIN_TOKEN
        self.settings_env: dict[str, str] = {
            "PORT_OFFSET": str(self.port_offset),
            "INVENTIV_DATA_DIR": str(self.data_dir),
            "INVENTIV_ADMIN_TOKEN": self.admin_token,
            "INVENTIV_ENV_FILE": str(self.data_dir / "dev.env"),
            "INVENTIV_LOG_LEVEL": "warning",
        }
        if database_url:
            self.settings_env["DATABASE_URL"] = database_url
        self.settings_env.update(env or {})
        self.database_url = database_url
        self.api_port = 8003 + self.port_offset
        self.orchestrator_port = 8001 + self.port_offset
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.orchestrator_url = f"http://127.0.0.1:{self.orchestrator_port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.client = httpx.Client(
            base_url=self.api_url,
            headers={"authorization": f"Bearer {self.admin_token}"},
            timeout=15.0,
            trust_env=False,
        )

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.settings_env}

    def _spawn(self, service: str) -> None:
        log = (self.data_dir / f"{service}.log").open("ab")
        self.procs[service] = subprocess.Popen(
            [sys.executable, "-m", "inventiv.cli", "serve", service],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def start_orchestrator(self) -> None:
        self._spawn("orchestrator")
        wait_http(self.orchestrator_url + "/healthz")

    def start_api(self) -> None:
        self._spawn("api")
        wait_http(self.api_url + "/")

    def start(self) -> Stack:
        self.start_orchestrator()
        self.start_api()
        wait_http(self.api_url + "/", predicate=lambda r: r.json()["orchestrator"] == "ok")
        return self

    def _stop(self, service: str, kill: bool = False) -> None:
        proc = self.procs.pop(service, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_orchestrator(self, kill: bool = False) -> None:
        self._stop("orchestrator", kill)

    def stop_api(self, kill: bool = False) -> None:
        self._stop("api", kill)

    def stop(self) -> None:
        self.stop_api()
        self.stop_orchestrator()

    def close(self) -> None:
        self.stop()
        self.client.close()
        self.kill_local_workers()

    def kill_local_workers(self) -> None:
        """Local workers outlive their control plane by design; a test's must not outlive it."""
        import psutil

        try:
            tag = "inventiv-stack=" + (self.data_dir / "stack-id").read_text().strip()
        except FileNotFoundError:
            return
        for proc in psutil.process_iter(["pid"]):
            try:
                if tag in proc.environ().get("INVENTIV_MACHINE_TAGS", "").split(","):
                    proc.kill()
            except (psutil.Error, OSError):
                continue

    def log(self, service: str) -> str:
        path = self.data_dir / f"{service}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- admin helpers ----------------------------------------------------------------------

    def create_instance(self, provider: str = "manual", model: str = "echo", **extra: Any) -> dict:
        response = self.client.post(
            "/api/instances", json={"provider": provider, "model": model, **extra}
        )
        assert response.status_code == 201, response.text
        return response.json()

    def get_instance(self, instance_id: str) -> dict:
        response = self.client.get(f"/api/instances/{instance_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def events(self, instance_id: str) -> list[dict]:
        response = self.client.get(f"/api/instances/{instance_id}/events")
        assert response.status_code == 200, response.text
        return response.json()["items"]

    def wait_status(self, instance_id: str, status: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        current: dict = {}
        while time.monotonic() < deadline:
            current = self.get_instance(instance_id)
            if current["status"] == status:
                return current
            time.sleep(0.1)
        raise AssertionError(
            f"instance {instance_id} still {current.get('status')!r}, wanted {status!r}"
        )


class StackFactory:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.stacks: list[Stack] = []

    def __call__(
        self, db: str = "sqlite", env: dict[str, str] | None = None, start: bool = True
    ) -> Stack:
        url = postgres_database() if db == "postgres" else None
        stack = Stack(self.tmp, url, env)
        self.stacks.append(stack)
        return stack.start() if start else stack

    def close(self) -> None:
        for stack in self.stacks:
            stack.close()


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[StackFactory]:
    factory = StackFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def stack(stack_factory: StackFactory) -> Stack:
    """A running stack on SQLite, for one test."""
    return stack_factory()


@pytest.fixture(scope="module")
def module_stack_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackFactory]:
    """Stacks that live as long as a module's tests."""
    factory = StackFactory(tmp_path_factory.mktemp("stack"))
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_stack(module_stack_factory: StackFactory) -> Stack:
    """A running stack on SQLite, shared by a module's tests."""
    return module_stack_factory()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A running stack shared by a module's tests, once on SQLite and once on PostgreSQL."""
    factory = StackFactory(tmp_path_factory.mktemp(f"stack-{request.param}"))
    try:
        yield factory(db=request.param)
    finally:
        factory.close()
