"""Heartbeat throughput and latency, end to end, side by side with a plain FastAPI endpoint.

Starts a real stack (orchestrator + API processes), creates and registers N workers, then drives
authenticated heartbeats with wrk (a C load generator, so the client costs little CPU) at 32
connections:

  1. end to end: wrk -> API -> keep-alive proxy -> orchestrator -> batched database write;
  2. the orchestrator alone (what the proxy hop costs);
  3. the baseline: one plain FastAPI process doing the same validation, token check and write.

All three run in one invocation on the same machine, so the ratios hold even on a noisy host.
Writes the figures into docs/benchmarks.md.

    python bench/heartbeats.py [--seconds 15] [--workers 200] [--connections 32]
                               [--db sqlite|postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    API_PORT,
    ORCHESTRATOR_PORT,
    ROOT,
    Stack,
    add_database_options,
    replace_section,
    spawn,
    stop,
    wait_http,
)

SECTION = "heartbeats"
BASELINE_PORT = 8005  # + PORT_OFFSET: the plain FastAPI process, after the stack has stopped


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    all_rps: list[float] = field(default_factory=list)
    all_p99: list[float] = field(default_factory=list)


E2E = "end to end (API+orchestrator)"
ORCH = "orchestrator alone"
BASE = "plain FastAPI baseline"


def median_run(runs: list[Result]) -> Result:
    """The run with the median throughput, and every run's figures kept for the report."""
    ordered = sorted(runs, key=lambda r: r.rps)
    chosen = ordered[len(ordered) // 2]
    chosen.all_rps = [r.rps for r in runs]
    chosen.all_p99 = [r.p99_ms for r in runs]
    return chosen


def lua_script(path: Path, target: str, workers: list[tuple[str, str]]) -> None:
    """wrk script: each request is a random registered worker's heartbeat with a rising seq."""
    entries = ",\n".join(f'  {{"{token}", "{instance}"}}' for instance, token in workers)
    body = json.dumps(
        {
            "instance_id": "%s",
            "worker_id": str(uuid.uuid4()),
            "seq": 0,
            "status": "ready",
            "model_id": "echo",
            "queue_depth": 1,
            "requests_running": 2,
            "gpus": [
                {
                    "index": 0,
                    "utilization": 50.0,
                    "memory_used_mb": 1000,
                    "memory_total_mb": 23034,
                    "temperature_c": 60,
                    "power_w": 70.5,
                }
            ],
            "system": {"cpu_percent": 10.0, "load1": 0.5},
        }
    ).replace('"seq": 0', '"seq": %d')
    path.write_text(
        f"""
local workers = {{
{entries}
}}
local seq = 0
math.randomseed(os.time())
request = function()
  seq = seq + 1
  local w = workers[math.random(#workers)]
  local body = string.format('{body}', w[2], seq)
  return wrk.format("POST", "{target}", {{
    ["Authorization"] = "Bearer " .. w[1],
    ["Content-Type"] = "application/json",
  }}, body)
end
"""
    )


def parse_wrk(name: str, output: str) -> Result:
    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if not match:
            raise ValueError(f"no {label}% latency in wrk output:\n{output}")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    errors = int(bad.group(1)) if bad else 0
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return Result(name, rps, latency("50"), latency("99"), errors, total)


def run_wrk(name: str, url: str, script: Path, seconds: int, connections: int) -> Result:
    subprocess.run(
        ["wrk", "-t1", f"-c{connections}", "-d2s", "-s", str(script), url],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = parse_wrk(name, out)
    print(
        f"{name:28} {result.rps:9.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
        f"p99 {result.p99_ms:6.2f} ms  errors {result.errors}",
        flush=True,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="runs per target; the median counts")
    add_database_options(parser, fallback_pg_url="")  # no PostgreSQL unless one is named
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk", file=sys.stderr)
        return 2

    stack = Stack(
        "bench",
        args.db,
        args.pg_url,
        keep_settings=True,  # the caller's INVENTIV_* settings apply: runs compare tuned ones
        ports=(ORCHESTRATOR_PORT, API_PORT, BASELINE_PORT),
    )
    profile = os.environ.get("BENCH_PROFILE")  # e.g. py-spy record -o prof.svg --
    api_profile = os.environ.get("BENCH_PROFILE_API")
    wrap = {
        "orchestrator": profile.split() if profile else [],
        "api": api_profile.split() if api_profile else [],
    }
    api_url, orch_url = stack.api_url, stack.orchestrator_url
    e2e_runs: list[Result] = []
    orch_runs: list[Result] = []
    base_runs: list[Result] = []
    try:
        stack.start(wrap)
        workers = []
        with stack.admin_client() as client:
            for _ in range(args.workers):
                created = client.post(
                    "/api/instances", json={"provider": "manual", "model": "echo"}
                ).json()
                answer = client.post(
                    "/internal/worker/register",
                    json={
                        "instance_id": created["id"],
                        "worker_id": str(uuid.uuid4()),
                        "agent_version": "bench",
                    },
                    headers={"authorization": f"Bearer {created['bootstrap_token']}"},
                ).json()
                workers.append((created["id"], answer["worker_token"]))
                # Its first heartbeat moves it starting -> ready (a synchronous write with its
                # events), as an agent's would: the runs then measure the steady state.
                first = client.post(
                    "/internal/worker/heartbeat",
                    json={
                        "instance_id": created["id"],
                        "worker_id": str(uuid.uuid4()),
                        "seq": 0,
                        "status": "ready",
                    },
                    headers={"authorization": f"Bearer {answer['worker_token']}"},
                )
                first.raise_for_status()
        script = stack.tmp / "heartbeat.lua"
        lua_script(script, "/internal/worker/heartbeat", workers)
        print(f"{args.workers} workers; {args.connections} connections, {args.seconds} s each")
        for _ in range(args.rounds):  # alternate, so a noisy moment hits both targets
            e2e_runs.append(run_wrk(E2E, api_url, script, args.seconds, args.connections))
            orch_runs.append(run_wrk(ORCH, orch_url, script, args.seconds, args.connections))
        with stack.admin_client() as client:
            time.sleep(0.5)
            items = client.get("/api/instances").json()["items"]
        persisted = sum(1 for i in items if (i["heartbeat_seq"] or 0) > 0)
        print(f"persisted: {persisted}/{len(items)} instances carry a benchmark heartbeat")
    finally:
        stack.stop(signal.SIGINT)  # lets a profiler wrapping a service write its output
    baseline_port = BASELINE_PORT + stack.offset
    baseline = spawn(
        [
            sys.executable,
            str(ROOT / "bench" / "baseline_fastapi.py"),
            str(baseline_port),
            stack.database_url,
        ],
        stack.env,
        stack.tmp / "baseline.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{baseline_port}/docs")
        for _ in range(args.rounds):
            base_runs.append(
                run_wrk(
                    BASE,
                    f"http://127.0.0.1:{baseline_port}",
                    script,
                    args.seconds,
                    args.connections,
                )
            )
    finally:
        stop(baseline, signal.SIGINT)
    results = [median_run(runs) for runs in (e2e_runs, orch_runs, base_runs)]
    end_to_end, _, base = results
    ratio = end_to_end.rps / base.rps
    print(f"end to end / baseline = {ratio:.2f}x")
    if not args.no_write:
        write_docs(args, results, ratio, persisted, len(items))
    if os.environ.get("BENCH_KEEP"):
        print(f"kept {stack.tmp}")
    else:
        shutil.rmtree(stack.tmp, ignore_errors=True)
    return 0


def write_docs(
    args: argparse.Namespace, results: list[Result], ratio: float, persisted: int, total: int
) -> None:
    command = (
        f"python bench/heartbeats.py --seconds {args.seconds} --workers {args.workers} "
        f"--connections {args.connections} --rounds {args.rounds} --db {args.db}"
    )
    machine = f"{os.cpu_count()} cores, Python {platform.python_version()}"
    rows = "\n".join(
        f"| {r.name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | "
        f"{' / '.join(f'{x:,.0f}' for x in r.all_rps)} | "
        f"{' / '.join(f'{x:.1f}' for x in r.all_p99)} |"
        for r in results
    )
    body = f"""### Heartbeats, {args.db} ({time.strftime("%Y-%m-%d")}, {machine})

`{command}`

{args.workers} registered workers, each already `ready` (its first heartbeat, which writes the
starting -> ready transition and its events, is sent at set-up, as an agent's would be);
{args.connections} connections, {args.rounds} runs of
{args.seconds} s per target (the API and orchestrator runs alternate), each after a 2 s warm-up,
wrk with one thread; the row shows the run with the median throughput, then every run.
Every request is an authenticated heartbeat with a rising
`seq`; the end-to-end run crosses the API, its keep-alive proxy and the orchestrator, and
{persisted}/{total} instances carried a benchmark heartbeat in the database afterwards.

| target | requests/s | p50 ms | p99 ms | errors | all runs, req/s | all runs, p99 ms |
|---|---|---|---|---|---|---|
{rows}

End to end / plain FastAPI baseline: **{ratio:.2f}x**."""
    replace_section(f"{SECTION}:{args.db}", body)


if __name__ == "__main__":
    sys.exit(main())
