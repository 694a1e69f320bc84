"""Two orchestrator replicas on one PostgreSQL database: every instance provisioned once.

Production runs more than one orchestrator for availability. Both serve /api and run the same
background jobs; job leases must make exactly one of them provision each instance, and the
conditional state transitions must keep a row from moving twice even if both touched it. Here
two real `inventiv serve orchestrator` processes share one database, stack id and admin token,
and 200 create requests are fired at them concurrently, half at each.

The manual provider's create has no visible effect, so the event log is what shows a single
provisioning there. A few local instances go in the same burst: each of their provider calls
starts an agent process, so a second provisioning would show up as a second process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import ADMIN_TOKEN, free_port_offset, postgres_database, wait_http

INSTANCES = 200
LOCAL_INSTANCES = 4  # each one is an agent and an engine process: a handful is enough


def agent_pids(instance_id: str) -> list[int]:
    """Agent processes (not their engines or guards, which share the environment)."""
    pids = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("INSTANCE_ID") != instance_id:
                continue
            cmdline = proc.cmdline()
            if cmdline[-1:] == ["worker"] and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return pids


def kill_tagged(stack_id: str) -> None:
    """Every process the replicas' local provider started (agents, engines, guards)."""
    tag = f"inventiv-stack={stack_id}"
    own = os.getpgid(0)
    for proc in psutil.process_iter(["pid"]):
        try:
            if tag in proc.environ().get("INVENTIV_MACHINE_TAGS", "").split(","):
                group = os.getpgid(proc.pid)
                if group != own:
                    os.killpg(group, signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, OSError):
            continue


class Replica:
    """One orchestrator process; it serves /api/* itself, so no API process is needed."""

    def __init__(self, tmp: Path, database_url: str, stack_id: str) -> None:
        self.offset = free_port_offset()
        self.url = f"http://127.0.0.1:{8001 + self.offset}"
        self.data_dir = tmp / f"replica-{self.offset}"
        self.data_dir.mkdir(parents=True)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("INVENTIV_")},
            "PORT_OFFSET": str(self.offset),
            "DATABASE_URL": database_url,
            "INVENTIV_STACK_ID": stack_id,
            "INVENTIV_ADMIN_TOKEN": ADMIN_TOKEN,
            "INVENTIV_DATA_DIR": str(self.data_dir),  # its own pid files, logs and socket
            "INVENTIV_ENV_FILE": str(self.data_dir / "none.env"),
            "INVENTIV_LOG_LEVEL": "warning",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.data_dir / "orchestrator.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "inventiv.cli", "serve", "orchestrator"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return (self.data_dir / "orchestrator.log").read_text(errors="replace")


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[Replica]]:
    database_url = postgres_database()
    stack_id = f"inventiv-replicas-{tmp_path.name[-8:]}"
    pair = [Replica(tmp_path, database_url, stack_id) for _ in range(2)]
    try:
        for replica in pair:  # started together: the migrations are serialised by a lock
            replica.start()
        for replica in pair:
            wait_http(replica.url + "/healthz", timeout=60)
        yield pair
    finally:
        for replica in pair:
            replica.stop()
        kill_tagged(stack_id)
        for replica in pair:
            print(f"--- replica {replica.offset}\n{replica.log()[-3000:]}")


async def create_all(urls: list[str], count: int, local: int) -> list[tuple[str, int, str, str]]:
    """Fire `count` creates at once, alternating replicas, `local` of them (spread through the
    burst) on the local provider; returns (replica, status, id, provider)."""
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(
        headers=headers, timeout=60, limits=limits, trust_env=False
    ) as client:
        every = count // local if local else count + 1

        async def create(i: int) -> tuple[str, int, str, str]:
            url = urls[i % len(urls)]
            provider = "local" if i % every == every // 2 else "manual"
            response = await client.post(
                f"{url}/api/instances", json={"provider": provider, "model": "echo"}
            )
            ident = response.json().get("id", "") if response.status_code == 201 else ""
            return url, response.status_code, ident or response.text, provider

        return await asyncio.gather(*(create(i) for i in range(count)))


def test_two_replicas_provision_each_instance_once(replicas: list[Replica]) -> None:
    urls = [r.url for r in replicas]
    results = asyncio.run(create_all(urls, INSTANCES, LOCAL_INSTANCES))
    assert Counter(status for _, status, _, _ in results) == {201: INSTANCES}, results[:5]
    assert Counter(url for url, _, _, _ in results) == {url: INSTANCES // 2 for url in urls}
    ids = [ident for _, _, ident, _ in results]
    assert len(set(ids)) == INSTANCES
    local_ids = [ident for _, _, ident, provider in results if provider == "local"]
    assert len(local_ids) == LOCAL_INSTANCES

    client = httpx.Client(headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, trust_env=False)
    deadline = time.monotonic() + 60
    statuses: Counter[str] = Counter()
    while time.monotonic() < deadline:
        # Alternate the replica asked: both must see the same shared state.
        listing = client.get(f"{urls[int(time.monotonic()) % 2]}/api/instances", timeout=30)
        statuses = Counter(i["status"] for i in listing.json()["items"] if i["id"] in ids)
        if statuses == {"booting": INSTANCES}:
            break
        time.sleep(0.5)
    assert statuses == {"booting": INSTANCES}, statuses

    # Give a second provisioning of any instance time to happen before counting events.
    time.sleep(3)
    for n, ident in enumerate(ids):
        events = client.get(f"{urls[n % 2]}/api/instances/{ident}/events", timeout=30)
        assert events.status_code == 200, events.text
        items = events.json()["items"]
        provider_created = [e for e in items if e["reason"] == "provider_created"]
        to_booting = [
            e for e in items if e["kind"] == "state_changed" and e["to_status"] == "booting"
        ]
        assert len(provider_created) == 1, (ident, items)
        assert len(to_booting) == 1, (ident, items)
        assert to_booting[0]["from_status"] == "provisioning"
        # Each manual instance has exactly its one operator-held bootstrap token: provisioning
        # does not mint another (it would if it ran as for machines Inventiv creates).
        assert [e["reason"] for e in items if e["kind"] == "token_issued"] == ["bootstrap"]
    client.close()
    # One provider call per instance: exactly one agent process for each local instance.
    # (Their API is not running, so they keep retrying their register: alive, not registered.)
    assert {i: len(agent_pids(i)) for i in local_ids} == {i: 1 for i in local_ids}
    for replica in replicas:
        assert replica.proc is not None and replica.proc.poll() is None, "a replica died"
        assert "Traceback" not in replica.log(), replica.log()[-3000:]


def test_a_reported_status_change_is_recorded_once_across_replicas(
    replicas: list[Replica],
) -> None:
    """Each replica's cache lags the other's writes by up to its reload period; the database,
    not the cache, must decide that a worker's reported status is new."""
    first, second = (r.url for r in replicas)
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(timeout=10, trust_env=False) as client:
        created = client.post(
            f"{first}/api/instances", json={"provider": "manual", "model": "echo"}, headers=admin
        ).json()
        ident = created["id"]
        body = {"instance_id": ident, "worker_id": "11111111-1111-4111-8111-111111111111"}
        registered = client.post(
            f"{first}/internal/worker/register",
            json={**body, "agent_version": "0.1.0"},
            headers={"authorization": f"Bearer {created['bootstrap_token']}"},
        )
        assert registered.status_code == 200, registered.text
        worker = {"authorization": f"Bearer {registered.json()['worker_token']}"}

        def heartbeat(url: str, seq: int, status: str) -> None:
            answer = client.post(
                f"{url}/internal/worker/heartbeat",
                json={**body, "seq": seq, "status": status},
                headers=worker,
            )
            assert answer.status_code == 200, answer.text

        # The second replica learns the instance while its worker reports `starting`...
        heartbeat(second, 1, "starting")
        # ...then the first hears `ready`, and the second hears it too before its next reload.
        heartbeat(first, 2, "ready")
        heartbeat(second, 3, "ready")
        heartbeat(first, 4, "ready")
        events = client.get(f"{first}/api/instances/{ident}/events", headers=admin).json()
    reported = [e["reason"] for e in events["items"] if e["kind"] == "worker_status"]
    assert reported == ["starting", "ready"], events["items"]
    to_ready = [e for e in events["items"] if e.get("to_status") == "ready"]
    assert len(to_ready) == 1, events["items"]
