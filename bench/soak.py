"""Soak: many healthy workers heartbeating for minutes must never be declared unreachable.

A false `unreachable` takes a healthy GPU worker out of routing, so the liveness watchdog must
keep its hands off workers that heartbeat on time, even with network jitter, a batched
soft-state writer and a busy database. This starts a real stack (orchestrator + API processes)
with DEFAULT settings, creates N manual instances, registers each over HTTP, then runs one
asyncio heartbeat loop per simulated worker in this one process: each heartbeat waits the
interval the server dictates plus an injected random delay of 0..--jitter-ms. At the end it
counts `state_changed -> unreachable` events across all instances; the expected count is 0.

    python bench/soak.py [--minutes 10] [--workers 200] [--jitter-ms 300]
                         [--db sqlite|postgres] [--no-write]

Everything stops by itself: the heartbeat loops at the deadline, the stack afterwards.
Writes its figures into docs/benchmarks.md between the `soak` markers (other sections kept).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import random
import shutil
import ssl
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import httpx

from common import Stack, add_database_options, replace_section

# One TLS context for the 200 clients: building one per client blocks the event loop for
# seconds (each loads the CA bundle), and the stack is plain http on loopback anyway.
TLS = ssl.create_default_context()
SECTION = "soak"


# --------------------------------------------------------------------------- workers


@dataclass
class Worker:
    instance_id: str
    worker_id: str
    token: str
    interval_s: float
    seq: int = 0
    accepted: list[float] = field(default_factory=list)  # wall-clock times of 200 answers
    exited: str | None = None  # why this simulated agent stopped, as a real one would


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    loop_lag_max_s: float = 0.0
    loop_lags_over_1s: list[tuple[float, float]] = field(default_factory=list)
    load_max: float = 0.0


async def enrol(client: httpx.AsyncClient) -> Worker:
    """Create one manual instance and register a worker for it, as `inventiv worker` would."""
    created = await client.post("/api/instances", json={"provider": "manual", "model": "echo"})
    created.raise_for_status()
    instance = created.json()
    worker_id = str(uuid.uuid4())
    answer = await client.post(
        "/internal/worker/register",
        json={
            "instance_id": instance["id"],
            "worker_id": worker_id,
            "agent_version": "soak",
            "model_id": "echo",
        },
        headers={"authorization": f"Bearer {instance['bootstrap_token']}"},
    )
    answer.raise_for_status()
    body = answer.json()
    return Worker(instance["id"], worker_id, body["worker_token"], body["heartbeat_interval_s"])


def heartbeat_body(worker: Worker) -> dict[str, object]:
    """What a real agent on a one-GPU machine sends: status, queue and device figures."""
    return {
        "instance_id": worker.instance_id,
        "worker_id": worker.worker_id,
        "seq": worker.seq,
        "status": "ready",
        "model_id": "echo",
        "queue_depth": random.randint(0, 4),
        "requests_running": random.randint(0, 16),
        "gpus": [
            {
                "index": 0,
                "utilization": round(random.uniform(0, 100), 1),
                "memory_used_mb": 20000,
                "memory_total_mb": 23034,
                "temperature_c": 60,
                "power_w": 70.5,
            }
        ],
        "system": {"cpu_percent": 10.0, "load1": 0.5},
        "simulated": True,
    }


async def heartbeat_loop(
    api_url: str, worker: Worker, tally: Tally, end: float, jitter_s: float
) -> None:
    """One simulated agent, with its own keep-alive connection like a real one: heartbeat at
    once after registering, then wait the dictated interval plus injected jitter. A failed
    heartbeat is retried the way the agent does it (full-jitter backoff from 0.5 s), and a
    401/404/409 ends the loop as it would end the agent."""
    failures = 0
    async with httpx.AsyncClient(
        base_url=api_url, timeout=10, trust_env=False, verify=TLS
    ) as client:
        while time.monotonic() < end:
            worker.seq += 1
            started = time.monotonic()
            tally.sent += 1
            delay = worker.interval_s + random.uniform(0, jitter_s)
            try:
                response = await client.post(
                    "/internal/worker/heartbeat",
                    json=heartbeat_body(worker),
                    headers={"authorization": f"Bearer {worker.token}"},
                )
            except httpx.HTTPError as exc:
                response = None
                tally.errors[type(exc).__name__] += 1
            if response is not None and response.status_code == 200:
                tally.ok += 1
                tally.latencies_ms.append((time.monotonic() - started) * 1000)
                worker.accepted.append(time.time())
                worker.interval_s = float(response.json()["heartbeat_interval_s"])
                failures = 0
            else:
                if response is not None:
                    code = response.json().get("error", "") if response.content else ""
                    tally.errors[f"HTTP {response.status_code} {code}".strip()] += 1
                    if response.status_code in (401, 404, 409):
                        worker.exited = f"HTTP {response.status_code} {code}"
                        return
                delay = random.uniform(0, min(60.0, 0.5 * 2**failures))
                failures += 1
            await asyncio.sleep(max(0.0, min(delay, end - time.monotonic())))


async def watch_host(tally: Tally, end: float) -> None:
    """How late this process's own event loop wakes up (a starved load generator sends late
    heartbeats, which is not the server's fault) and the host's load average."""
    while time.monotonic() < end:
        before = time.monotonic()
        await asyncio.sleep(0.1)
        lag = time.monotonic() - before - 0.1
        tally.loop_lag_max_s = max(tally.loop_lag_max_s, lag)
        if lag > 1.0:
            tally.loop_lags_over_1s.append((time.time(), lag))
        tally.load_max = max(tally.load_max, os.getloadavg()[0])


async def soak(args: argparse.Namespace, stack: Stack) -> dict[str, object]:
    tally = Tally()
    workers: list[Worker] = []
    started = time.monotonic()
    end = started + args.minutes * 60
    helpers = [
        asyncio.create_task(report_progress(tally, started, end)),
        asyncio.create_task(watch_host(tally, end)),
    ]
    async with stack.admin_async_client() as admin:
        gate = asyncio.Semaphore(8)  # the fleet boots over a few seconds, not in one instant

        async def agent() -> None:
            async with gate:
                worker = await enrol(admin)
            workers.append(worker)
            await heartbeat_loop(stack.api_url, worker, tally, end, args.jitter_ms / 1000)

        await asyncio.gather(*(agent() for _ in range(args.workers)))
    for task in helpers:
        task.cancel()
    elapsed = time.monotonic() - started

    await asyncio.sleep(0.5)  # let the last batch of soft state reach the database
    async with stack.admin_async_client() as admin:
        unreachable: list[dict[str, object]] = []
        statuses: Counter[str] = Counter()
        for w in workers:
            events = (await admin.get(f"/api/instances/{w.instance_id}/events")).json()["items"]
            for e in events:
                if e["kind"] == "state_changed" and e["to_status"] == "unreachable":
                    unreachable.append({**e, **client_view(w, e["at"])})
            statuses[(await admin.get(f"/api/instances/{w.instance_id}")).json()["status"]] += 1
    lat = sorted(tally.latencies_ms) or [0.0]
    gaps = [b - a for w in workers for a, b in itertools.pairwise(w.accepted)]
    return {
        "workers": len(workers),
        "elapsed_s": elapsed,
        "sent": tally.sent,
        "ok": tally.ok,
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "exited": Counter(w.exited for w in workers if w.exited),
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_ms": lat[-1],
        "slow_1s": sum(1 for x in lat if x > 1000),
        "max_gap_s": max(gaps, default=0.0),
        "gaps_over_grace": sum(1 for g in gaps if g > 7.0),
        "loop_lag_max_s": tally.loop_lag_max_s,
        "loop_lags_over_1s": tally.loop_lags_over_1s,
        "load_max": tally.load_max,
        "unreachable": unreachable,
        "statuses": dict(statuses),
        "interval_s": workers[0].interval_s if workers else None,
    }


def client_view(worker: Worker, at: str) -> dict[str, object]:
    """What the simulated worker itself saw around a server-side `unreachable`: when its last
    accepted heartbeat before that moment was, and the gap it was in the middle of."""
    when = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
    before = [t for t in worker.accepted if t <= when]
    after = [t for t in worker.accepted if t > when]
    last = before[-1] if before else None
    return {
        "instance_id": worker.instance_id,
        "client_last_ok_age_s": when - last if last is not None else None,
        "client_gap_s": (after[0] - last) if last is not None and after else None,
    }


async def report_progress(tally: Tally, started: float, end: float) -> None:
    while time.monotonic() < end:
        await asyncio.sleep(60)
        print(
            f"  {time.monotonic() - started:5.0f} s: {tally.sent} heartbeats sent, "
            f"{sum(tally.errors.values())} errors {dict(tally.errors)}, load "
            f"{os.getloadavg()[0]:.1f}, max loop lag {tally.loop_lag_max_s:.2f} s",
            flush=True,
        )


# --------------------------------------------------------------------------- report


def diagnosis(result: dict[str, object]) -> list[str]:
    """One line per cause visible in the figures, for the report and the docs."""
    unreachable = result["unreachable"]
    assert isinstance(unreachable, list)
    if not unreachable:
        return []
    ages = [u["client_last_ok_age_s"] for u in unreachable if u["client_last_ok_age_s"]]
    late_client = sum(1 for a in ages if a > 7.0)
    lines = [
        f"{len(unreachable)} unreachable transitions on "
        f"{len({u['instance_id'] for u in unreachable})} instances; "
        f"{len(unreachable) - len(ages)} before the worker's first accepted heartbeat."
    ]
    if ages:
        lines.append(
            f"At the others the worker's last accepted heartbeat (client clock) was "
            f"{min(ages):.1f}-{max(ages):.1f} s old; {late_client} older than the 7 s grace."
        )
    if not ages:
        pass
    elif late_client == len(ages):
        lines.append(
            "Every one of them follows a real gap of more than 7 s between accepted heartbeats "
            "(the server was right by its clock): heartbeats were sent or answered late, see the "
            "latency, load and loop-lag figures."
        )
    else:
        lines.append(
            f"{len(ages) - late_client} happened although the worker had a heartbeat accepted "
            "less than 7 s earlier: the server's view of last-seen lagged the answers."
        )
    lags = result["loop_lags_over_1s"]
    assert isinstance(lags, list)
    if lags:
        lines.append(
            f"The load process itself stalled over 1 s {len(lags)} times (max "
            f"{result['loop_lag_max_s']:.1f} s): the host was starved."
        )
    return lines


def write_docs(
    args: argparse.Namespace, result: dict[str, object], warnings: int, notes: list[str]
) -> None:
    command = (
        f"python bench/soak.py --minutes {args.minutes:g} --workers {args.workers} "
        f"--jitter-ms {args.jitter_ms:g} --db {args.db}"
    )
    machine = f"{os.cpu_count()} cores, Python {platform.python_version()}"
    unreachable = result["unreachable"]
    assert isinstance(unreachable, list)
    verdict = "**0**" if not unreachable else f"**{len(unreachable)}**"
    day = time.strftime("%Y-%m-%d")
    latency = f"{result['p50_ms']:.1f} / {result['p99_ms']:.1f} / {result['max_ms']:.1f} ms"
    errors = f"{result['errors']} {result['error_kinds'] or ''}".strip()
    explained = "\n".join(f"- {line}" for line in notes) or (
        "No worker was ever declared unreachable: the watchdog left every healthy worker in "
        "routing."
    )
    title = f"Soak: {result['workers']} healthy workers, {args.minutes:g} min ({day}, {machine})"
    body = f"""### {title}

`{command}`

A stack with default settings (heartbeat every {result["interval_s"]:g} s, grace 7 s, watchdog
every 1 s, soft state flushed every 0.2 s) on {args.db}. {result["workers"]} manual instances
registered over HTTP, 8 at a time (the fleet boots over a few seconds); one asyncio loop per
simulated worker, each with its own keep-alive connection like a real agent, all in one load
process. Each worker heartbeats at once after registering, then waits the interval the server
dictates plus an injected random 0-{args.jitter_ms:g} ms; a failed heartbeat is retried like the
agent does (full-jitter backoff from 0.5 s).

| figure | value |
|---|---|
| heartbeats sent | {result["sent"]:,} |
| answered 200 | {result["ok"]:,} |
| errors | {errors} |
| latency p50 / p99 / max | {latency} |
| heartbeats slower than 1 s | {result["slow_1s"]} |
| longest gap between two accepted heartbeats of one worker | {result["max_gap_s"]:.2f} s |
| gaps longer than the 7 s grace | {result["gaps_over_grace"]} |
| load process: longest event-loop stall | {result["loop_lag_max_s"]:.2f} s |
| host load average (1 min), highest seen | {result["load_max"]:.2f} |
| `state_changed -> unreachable` events | {verdict} |
| statuses at the end | {result["statuses"]} |
| orchestrator/API warnings or errors logged | {warnings} |

{explained}"""
    replace_section(SECTION, body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--jitter-ms", type=float, default=300.0)
    add_database_options(parser)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes must be in (0, 1440]")

    stack = Stack("soak", args.db, args.pg_url)
    try:
        stack.start()
        result = asyncio.run(soak(args, stack))
    finally:
        stack.stop()
    logged = [
        line
        for service in ("orchestrator", "api")
        for line in stack.log_lines(service)
        if " WARNING " in line or " ERROR " in line
    ]
    print(
        f"{result['workers']} workers, {result['elapsed_s']:.0f} s: {result['sent']} heartbeats "
        f"sent, {result['ok']} ok, {result['errors']} errors {result['error_kinds']}; latency "
        f"p50 {result['p50_ms']:.1f} ms p99 {result['p99_ms']:.1f} ms max "
        f"{result['max_ms']:.1f} ms; longest gap {result['max_gap_s']:.2f} s; load max "
        f"{result['load_max']:.2f}; loop lag max {result['loop_lag_max_s']:.2f} s"
    )
    unreachable = result["unreachable"]
    assert isinstance(unreachable, list)
    print(f"unreachable transitions: {len(unreachable)}; statuses at the end: {result['statuses']}")
    for event in unreachable[:30]:
        print(
            f"  {event['instance_id']} at {event['at']}: {event['message']} (client: last ok "
            f"{event['client_last_ok_age_s']} s before, gap {event['client_gap_s']} s)"
        )
    for line in logged[:20]:
        print(f"  log: {line}")
    notes = diagnosis(result)
    for line in notes:
        print(line)
    if not args.no_write:
        write_docs(args, result, len(logged), notes)
    failed = bool(unreachable or result["errors"])
    if os.environ.get("BENCH_KEEP") or failed:
        print(f"kept the stack's data directory (logs, database): {stack.tmp}")
    else:
        shutil.rmtree(stack.tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
