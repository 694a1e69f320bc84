"""Plumbing the benchmark scripts share: a throw-away stack, its database, and their docs section.

Every benchmark measures a real stack (orchestrator + API processes) started the way an operator
starts one, so each needs the same pieces: free ports, a fresh database, processes that stop
cleanly, and a way to put its figures in docs/benchmarks.md without touching the other
benchmarks' sections. The scripts run as `python bench/<name>.py`, which puts this directory on
sys.path, so they import this module as `common`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from inventiv.stack import port_free

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
DOCS_HEADER = (
    "# Benchmarks\n\nFigures measured on this project's machines, with the command that "
    "produced them.\n"
)
ORCHESTRATOR_PORT = 8001  # + PORT_OFFSET, as in inventiv.config
API_PORT = 8003
LOCAL_PG_URL = "postgresql+asyncpg://postgres:postgres@127.0.0.1:5432/postgres"


def add_database_options(
    parser: argparse.ArgumentParser, fallback_pg_url: str = LOCAL_PG_URL
) -> None:
    """--db and --pg-url: every benchmark runs on SQLite or, to compare, on PostgreSQL (the
    server named by INVENTIV_TEST_PG_URL, as the tests use, else `fallback_pg_url`)."""
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--pg-url", default=os.environ.get("INVENTIV_TEST_PG_URL", fallback_pg_url))


def free_offset(bases: Sequence[int] = (ORCHESTRATOR_PORT, API_PORT)) -> int:
    """A PORT_OFFSET under which every port in `bases` is free. Picked at random, so benchmarks
    and test stacks running at the same time rarely probe the same offset."""
    for _ in range(500):
        offset = random.randrange(40000, 50000, 10)
        if all(port_free(base + offset) for base in bases):
            return offset
    raise RuntimeError("no free PORT_OFFSET")


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Return once `url` answers at all (any status): the service is up and accepting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1, trust_env=False)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


def create_pg_database(pg_url: str, label: str) -> str:
    """A new, empty PostgreSQL database next to the one `pg_url` names, and its URL: each run
    starts from an empty schema and never shares rows with tests or other runs."""
    import asyncpg  # only PostgreSQL runs need the driver

    name = f"inventiv_{label}_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        conn = await asyncpg.connect(pg_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return pg_url.rpartition("/")[0] + "/" + name


def spawn(args: Sequence[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a process with its output appended to `log`, which stays for a post-mortem."""
    return subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask a process to stop with `sig` (SIGINT lets a profiler wrapping it write its output),
    and kill it if it has not stopped within 20 s."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Stack:
    """Orchestrator + API in a throw-away data directory, with their own ports, admin token and
    database. `label` names its directory, token and database, so leftovers say which
    benchmark made them.

    The caller's INVENTIV_*/WORKER_* settings are dropped, since default timings are what the
    figures claim, unless `keep_settings` is set (to measure a tuned setting). DATABASE_URL is
    always the stack's own: a new PostgreSQL database, or SQLite in the data directory.
    """

    def __init__(
        self,
        label: str,
        db: str,
        pg_url: str,
        *,
        keep_settings: bool = False,
        ports: Sequence[int] = (ORCHESTRATOR_PORT, API_PORT),
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"inventiv-{label}-"))
        self.offset = free_offset(ports)
        self.admin = f"{label}-{uuid.uuid4().hex}"
        self.api_url = f"http://127.0.0.1:{API_PORT + self.offset}"
        self.orchestrator_url = f"http://127.0.0.1:{ORCHESTRATOR_PORT + self.offset}"
        self.database_url = (
            create_pg_database(pg_url, label)
            if db == "postgres"
            else f"sqlite+aiosqlite:///{self.tmp / 'inventiv.db'}"
        )
        self.env = {
            k: v
            for k, v in os.environ.items()
            if keep_settings or not k.startswith(("INVENTIV_", "WORKER_"))
        }
        self.env.update(
            {
                "PORT_OFFSET": str(self.offset),
                "INVENTIV_DATA_DIR": str(self.tmp),
                "INVENTIV_ADMIN_TOKEN": self.admin,
                "DATABASE_URL": self.database_url,
                "INVENTIV_ENV_FILE": str(self.tmp / "none.env"),
                "INVENTIV_LOG_LEVEL": "warning",
            }
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, wrap: Mapping[str, Sequence[str]] | None = None) -> None:
        """Start the orchestrator, then the API, each once the one before answers. `wrap` puts
        a command in front of a service, e.g. {"api": ["py-spy", "record", "-o", "a.svg", "--"]}."""
        for service, ready in (
            ("orchestrator", self.orchestrator_url + "/healthz"),
            ("api", self.api_url + "/"),
        ):
            prefix = (wrap or {}).get(service, ())
            command = [*prefix, sys.executable, "-m", "inventiv.cli", "serve", service]
            self.procs.append(spawn(command, self.env, self.tmp / f"{service}.log"))
            wait_http(ready)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the API first, so nothing reaches an orchestrator that is going away."""
        for proc in reversed(self.procs):
            stop(proc, sig)

    def admin_client(self, timeout: float = 30.0) -> httpx.Client:
        """A client of the stack's API carrying its admin token."""
        return httpx.Client(**self._admin_client_options(timeout))

    def admin_async_client(self, timeout: float = 30.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(**self._admin_client_options(timeout))

    def _admin_client_options(self, timeout: float) -> dict[str, Any]:
        return {
            "base_url": self.api_url,
            "headers": {"authorization": f"Bearer {self.admin}"},
            "timeout": timeout,
            "trust_env": False,
        }

    def log_lines(self, service: str) -> list[str]:
        path = self.tmp / f"{service}.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []


def replace_section(name: str, body: str) -> None:
    """Put `body` between the `<!-- name:start -->` and `<!-- name:end -->` markers of
    docs/benchmarks.md, keeping the file's header and every other benchmark's section; a
    section not there yet is appended."""
    section = f"<!-- {name}:start -->\n{body}\n<!-- {name}:end -->"
    text = DOCS.read_text() if DOCS.exists() else DOCS_HEADER
    pattern = re.compile(
        rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    DOCS.write_text(text)
    print(f"wrote {DOCS.relative_to(ROOT)}")
