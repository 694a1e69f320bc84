"""The instance lifecycle end to end with the local provider: real agent and echo-engine
processes started by the orchestrator, killed, restarted and reaped on loopback.

Each test drives one failure an operator meets on a real fleet (agent crash, engine crash,
control plane outage, termination, orphan and vanished machines, a worker that never shows up)
and checks what the control plane records about it. Timings are shortened with environment
overrides wherever the point is not the default values; the first test keeps the defaults
because "ready within 5 s" is the promise being checked.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from inventiv.agent.identity import WORKER_TOKEN_FILE
from inventiv.agent.metrics import parse_prometheus
from tests.conftest import Stack, StackFactory, free_port

# Short liveness timings: detection bound = grace + watchdog period + flush = 3 + 1 + 0.2 s.
INTERVAL_S = 1.0
GRACE_S = 3.0
WATCHDOG_S = 1.0
FLUSH_S = 0.2
FAST = {
    "INVENTIV_HEARTBEAT_INTERVAL_S": f"{INTERVAL_S:g}",
    "INVENTIV_HEARTBEAT_GRACE_S": f"{GRACE_S:g}",
    "INVENTIV_WATCHDOG_PERIOD_S": f"{WATCHDOG_S:g}",
    "INVENTIV_HEARTBEAT_FLUSH_S": f"{FLUSH_S:g}",
}
# Slack for polling the API every 50 ms, one watchdog tick's own duration and a busy CI host.
SLACK_S = 1.0
# The agent's retry backoff is capped at 60 s (docs/agent.md), so after an outage the first
# retry may come up to a minute after the control plane is back.
AGENT_RETRY_CAP_S = 60.0


# --------------------------------------------------------------------------- helpers


def until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} not reached within {timeout:g} s")


def alive(pid: int) -> bool:
    """A zombie counts as dead: it is only waiting for its parent to collect its exit code."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def role_of(cmdline: list[str]) -> str:
    """The local provider puts the same environment on the agent, its engine and the engine's
    guard (the engine inherits the agent's), so the command line tells them apart."""
    text = " ".join(cmdline)
    if "inventiv.agent.guard" in text:
        return "guard"
    if "engine" in cmdline:
        return "engine"
    if "worker" in cmdline:
        return "agent"
    return "other"


def processes(match: Callable[[dict[str, str]], bool]) -> list[tuple[psutil.Process, str]]:
    """Live processes whose environment matches, with their role."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
            if not match(env) or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found.append((proc, role_of(proc.cmdline())))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def instance_processes(instance_id: str) -> list[tuple[psutil.Process, str]]:
    return processes(lambda env: env.get("INSTANCE_ID") == instance_id)


def one(instance_id: str, role: str) -> psutil.Process | None:
    found = [p for p, r in instance_processes(instance_id) if r == role]
    return found[0] if len(found) == 1 else None


def epoch(value: str) -> float:
    """An API timestamp (ISO 8601, UTC) as Unix seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def stack_id(stack: Stack) -> str:
    return (stack.data_dir / "stack-id").read_text().strip()


def wait_status(stack: Stack, instance_id: str, status: str, timeout: float) -> dict:
    """Like Stack.wait_status, but polling every 50 ms so elapsed times are meaningful."""
    return until(
        lambda: (i := stack.get_instance(instance_id))["status"] == status and i,
        timeout,
        f"instance {instance_id} {status}",
    )


def state_changes(stack: Stack, instance_id: str) -> list[tuple[str | None, str | None, str]]:
    return [
        (e["from_status"], e["to_status"], e["reason"])
        for e in stack.events(instance_id)
        if e["kind"] == "state_changed"
    ]


def reasons(stack: Stack, instance_id: str, kind: str) -> list[str]:
    return [e["reason"] for e in stack.events(instance_id) if e["kind"] == kind]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def heartbeat(stack: Stack, instance: dict, token: str) -> httpx.Response:
    body = {
        "instance_id": instance["id"],
        "worker_id": instance["worker_id"] or str(uuid.uuid4()),
        "seq": 10_000,
        "status": "ready",
    }
    return httpx.post(
        f"{stack.api_url}/internal/worker/heartbeat",
        json=body,
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
        trust_env=False,
    )


def agent_metrics(instance: dict) -> dict[str, float]:
    try:
        response = httpx.get(
            f"http://127.0.0.1:{instance['health_port']}/metrics", timeout=2, trust_env=False
        )
    except httpx.HTTPError:
        return {}
    return parse_prometheus(response.text)


class Fleet:
    """What a test started, so teardown leaves no agent or engine behind: every process tagged
    with one of the test's stacks (agents the orchestrator spawned, their engines and guards)
    and every agent the test started by hand."""

    def __init__(self, factory: StackFactory, tmp: Path) -> None:
        self.factory = factory
        self.tmp = tmp
        self.stacks: list[Stack] = []
        self.started: list[subprocess.Popen[bytes]] = []

    def stack(self, env: dict[str, str] | None = None) -> Stack:
        stack = self.factory(env=env)
        self.stacks.append(stack)
        return stack

    def start_agent(self, cmdline: list[str], env: dict[str, str], cwd: str) -> psutil.Process:
        """Start an agent the way an operator would on the VM: same command, same environment,
        its own session (like systemd), output appended to the machine's agent log."""
        log_path = self.tmp / f"hand-agent-{len(self.started)}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                cmdline,
                env=env,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append(proc)
        return psutil.Process(proc.pid)

    def close(self) -> None:
        tags = set()
        for stack in self.stacks:
            try:
                tags.add(f"inventiv-stack={stack_id(stack)}")
            except OSError:
                continue
        own_group = os.getpgid(0)
        doomed = [
            p
            for p, _ in processes(
                lambda env: bool(tags & set(env.get("INVENTIV_MACHINE_TAGS", "").split(",")))
            )
        ]
        doomed += [psutil.Process(p.pid) for p in self.started if p.poll() is None]
        for proc in doomed:
            try:
                group = os.getpgid(proc.pid)
                if group != own_group:
                    os.killpg(group, signal.SIGKILL)
                else:
                    proc.kill()
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                continue
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for stack in self.stacks:  # shown when the test failed
            for log in sorted((stack.data_dir / "workers").glob("*/agent.log")):
                print(f"--- {log.parent.name}/agent.log\n{log.read_text(errors='replace')[-3000:]}")
            print(f"--- orchestrator.log\n{stack.log('orchestrator')[-3000:]}")
        for log in sorted(self.tmp.glob("hand-agent-*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def fleet(stack_factory: StackFactory, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(stack_factory, tmp_path)
    try:
        yield f
    finally:
        f.close()


def create_ready(stack: Stack, timeout: float = 30.0) -> dict:
    instance = stack.create_instance(provider="local", model="echo")
    return wait_status(stack, instance["id"], "ready", timeout)


# --------------------------------------------------------------------------- tests


def test_local_instance_ready_within_5_s_with_defaults(fleet: Fleet) -> None:
    stack = fleet.stack()  # default timings: this is the promise made to operators
    started = time.monotonic()
    response = stack.client.post("/api/instances", json={"provider": "local", "model": "echo"})
    assert response.status_code == 201, response.text
    iid = response.json()["id"]
    ready = wait_status(stack, iid, "ready", timeout=15)
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"ready after {elapsed:.2f} s"
    print(f"local echo instance ready {elapsed:.2f} s after the POST")

    assert ready["provider_id"] == f"local-{iid}"
    assert ready["worker_status"] == "ready" and ready["engine_port"] and ready["health_port"]
    assert [(a, b) for a, b, _ in state_changes(stack, iid)] == [
        ("provisioning", "booting"),
        ("booting", "starting"),
        ("starting", "ready"),
    ]
    # `ready` reaches the control plane as soon as the agent sees it, not one heartbeat
    # interval (3 s here) later: the agent's pause between heartbeats wakes on a status change.
    log = (stack.data_dir / "workers" / ready["provider_id"] / "agent.log").read_text()
    line = next(x for x in log.splitlines() if "status starting -> ready" in x)
    seen = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
    recorded = next(e["at"] for e in stack.events(iid) if e["to_status"] == "ready")
    assert epoch(recorded) - seen < 1.0, f"ready recorded {epoch(recorded) - seen:.2f} s late"
    # The engine really serves the model on the port the agent registered.
    models = httpx.get(f"http://127.0.0.1:{ready['engine_port']}/v1/models", trust_env=False)
    assert [m["id"] for m in models.json()["data"]] == ["echo"]
    # The machine is tagged with its stack and instance, as reconciliation expects.
    agent = one(iid, "agent")
    assert agent is not None
    tags = agent.environ()["INVENTIV_MACHINE_TAGS"].split(",")
    assert sorted(tags) == sorted([f"inventiv-stack={stack_id(stack)}", f"inventiv-instance={iid}"])


def test_killed_agent_unreachable_then_restarted_by_hand(fleet: Fleet) -> None:
    stack = fleet.stack(env=FAST)
    ready = create_ready(stack)
    iid, provider_id = ready["id"], ready["provider_id"]
    agent = one(iid, "agent")
    engine = one(iid, "engine")
    assert agent is not None and engine is not None
    env, cmdline, cwd = agent.environ(), agent.cmdline(), agent.cwd()
    assert env["INVENTIV_LOCAL_ROLE"] == "agent" and env["INVENTIV_MACHINE_ID"] == provider_id

    killed_at = time.monotonic()
    agent.send_signal(signal.SIGKILL)
    wait_status(stack, iid, "unreachable", timeout=GRACE_S + WATCHDOG_S + FLUSH_S + 10)
    detected = time.monotonic() - killed_at
    bound = GRACE_S + WATCHDOG_S + FLUSH_S
    print(f"unreachable {detected:.2f} s after kill -9 (bound {bound:g} s + {SLACK_S:g} s slack)")
    assert detected <= bound + SLACK_S
    assert state_changes(stack, iid)[-1] == ("ready", "unreachable", "heartbeat_timeout")
    # The guard took the engine down with the agent: no GPU is held by a headless engine.
    until(lambda: not alive(engine.pid), 20, "engine stopped by its guard")

    # The operator restarts the agent on the "VM" with the very same environment.
    restarted = fleet.start_agent(cmdline, env, cwd)
    back = wait_status(stack, iid, "ready", timeout=30)
    assert back["id"] == iid and back["provider_id"] == provider_id
    assert restarted.pid != agent.pid and alive(restarted.pid)
    assert one(iid, "agent") is not None and one(iid, "agent").pid == restarted.pid  # type: ignore[union-attr]
    # Nothing was provisioned again, and the second register used the stored worker token.
    changes = state_changes(stack, iid)
    assert [c for c in changes if c[2] == "provider_created"] == [
        ("provisioning", "booting", "provider_created")
    ]
    assert [c for c in changes if c[1] == "booting"] == [changes[0]]
    assert reasons(stack, iid, "registered") == ["bootstrap", "reregister"]
    assert reasons(stack, iid, "token_issued").count("bootstrap_exchanged") == 1
    assert changes[-1][1] == "ready" and ("ready", "unreachable", "heartbeat_timeout") in changes


def test_killed_engine_is_restarted_by_the_agent(fleet: Fleet) -> None:
    stack = fleet.stack(env=FAST)
    ready = create_ready(stack)
    iid = ready["id"]
    agent, engine = one(iid, "agent"), one(iid, "engine")
    assert agent is not None and engine is not None
    assert engine.environ()["INSTANCE_ID"] == iid and engine.ppid() == agent.pid
    before = len(state_changes(stack, iid))

    engine.send_signal(signal.SIGKILL)
    new_engine = until(
        lambda: (e := one(iid, "engine")) is not None and e.pid != engine.pid and e,
        20,
        "a new engine process",
    )
    assert new_engine.ppid() == agent.pid and alive(agent.pid)
    until(
        lambda: agent_metrics(ready).get("inventiv_agent_engine_restarts_total") == 1, 20, "restart"
    )
    back = wait_status(stack, iid, "ready", timeout=20)
    # The agent reported the crash (starting) before the engine served again (ready).
    after = state_changes(stack, iid)[before:]
    assert ("ready", "starting", "worker_starting") in after, after
    assert after[-1][:2] == ("starting", "ready")
    # Same port, same model, new process: routing can keep the address it had.
    assert back["engine_port"] == ready["engine_port"]
    models = httpx.get(f"http://127.0.0.1:{back['engine_port']}/v1/models", trust_env=False)
    assert [m["id"] for m in models.json()["data"]] == ["echo"]


def test_control_plane_outage_agent_backs_off_and_comes_back(fleet: Fleet) -> None:
    stack = fleet.stack(env=FAST)
    ready = create_ready(stack)
    iid = ready["id"]
    agent, engine = one(iid, "agent"), one(iid, "engine")
    assert agent is not None and engine is not None
    registrations = reasons(stack, iid, "registered")

    stack.stop()  # API and orchestrator both gone
    down_at = time.monotonic()
    while time.monotonic() - down_at < 30.0:
        assert alive(agent.pid) and alive(engine.pid), "the agent gave up during the outage"
        time.sleep(1.0)
    metrics = agent_metrics(ready)  # the agent's own health server still answers
    failures = metrics.get("inventiv_agent_heartbeat_failures_total", 0)
    assert metrics.get("inventiv_agent_up") == 1
    assert metrics.get("inventiv_agent_control_plane_unreachable_seconds", 0) >= 25
    # Connection refused is instant: without backoff there would be thousands of attempts.
    assert 1 <= failures <= 25, f"{failures} failed heartbeats in 30 s: no backoff?"

    restart_wall = time.time()
    stack.start()
    # Nothing is done to the agent: its next retry (at most the 60 s backoff cap away) lands.
    back = until(
        lambda: (
            (i := stack.get_instance(iid))["status"] == "ready"
            and i["last_heartbeat_at"] is not None
            and epoch(i["last_heartbeat_at"]) > restart_wall
            and i
        ),
        AGENT_RETRY_CAP_S + 10,
        "ready with a heartbeat sent after the restart",
        every=0.2,
    )
    print(f"ready again {time.time() - restart_wall:.1f} s after the control plane restarted")
    assert one(iid, "agent").pid == agent.pid and alive(engine.pid)  # type: ignore[union-attr]
    assert back["worker_id"] == ready["worker_id"]
    assert reasons(stack, iid, "registered") == registrations  # heartbeats simply resumed
    log = (stack.data_dir / "workers" / ready["provider_id"] / "agent.log").read_text()
    assert "control plane unreachable since" in log and "reachable again" in log


def test_terminate_stops_processes_and_revokes_tokens(fleet: Fleet) -> None:
    stack = fleet.stack(env=FAST)
    ready = create_ready(stack)
    iid = ready["id"]
    state_dir = stack.data_dir / "workers" / ready["provider_id"]
    token = (state_dir / WORKER_TOKEN_FILE).read_text().strip()
    assert token.startswith("ivt_work_")
    assert heartbeat(stack, ready, token).status_code == 200
    pids = [p.pid for p, _ in instance_processes(iid)]
    roles = sorted(r for _, r in instance_processes(iid))
    assert roles == ["agent", "engine", "guard"]

    response = stack.client.delete(f"/api/instances/{iid}")
    assert response.status_code == 202, response.text
    done = wait_status(stack, iid, "terminated", timeout=30)
    assert done["terminated_at"] is not None
    until(lambda: not any(alive(pid) for pid in pids), 15, "agent, engine and guard gone")
    assert instance_processes(iid) == []
    assert not port_open(ready["engine_port"]), "the engine's port still answers"
    assert not state_dir.exists()  # the local "machine" is deleted

    refused = heartbeat(stack, ready, token)
    assert refused.status_code == 401 and refused.json()["error"] == "token_revoked", refused.text
    changes = state_changes(stack, iid)
    assert changes[-2:] == [
        ("ready", "terminating", "operator_request"),
        ("terminating", "terminated", "machine_released"),
    ]


def test_reconciliation_orphan_and_vanished_machine(fleet: Fleet, tmp_path: Path) -> None:
    stack = fleet.stack(
        env={**FAST, "INVENTIV_RECONCILE_PERIOD_S": "1", "INVENTIV_ORPHAN_GRACE_S": "2"}
    )
    # A machine that vanishes: its agent dies and its disk is gone (deleted at the provider).
    doomed = create_ready(stack)
    doomed_agent = one(doomed["id"], "agent")
    assert doomed_agent is not None
    doomed_dir = stack.data_dir / "workers" / doomed["provider_id"]
    doomed_token = (doomed_dir / WORKER_TOKEN_FILE).read_text().strip()
    doomed_agent.send_signal(signal.SIGKILL)
    shutil.rmtree(doomed_dir)
    vanished_at = time.monotonic()

    # Meanwhile, an orphan: a process carrying this stack's tags under a machine id no record
    # knows (a machine whose record was lost). It points at a dead URL so it lingers, trying to
    # register, with its own state dir so it cannot disturb the valid instance.
    keeper = create_ready(stack)
    template = one(keeper["id"], "agent")
    assert template is not None
    env = template.environ()
    orphan_id = f"local-orphan-{uuid.uuid4().hex[:8]}"
    orphan_state = tmp_path / orphan_id
    env.update(
        {
            "INVENTIV_MACHINE_ID": orphan_id,
            "INSTANCE_ID": str(uuid.uuid4()),
            "WORKER_STATE_DIR": str(orphan_state),
            "WORKER_CONTROL_PLANE_URL": f"http://127.0.0.1:{free_port()}",
            "INVENTIV_BOOTSTRAP_TOKEN": "ivt_boot_lost",
        }
    )
    env.pop("INVENTIV_BOOTSTRAP_TOKEN_FILE", None)
    env.pop("WORKER_CONTROL_PLANE_URL_FILE", None)
    assert f"inventiv-stack={stack_id(stack)}" in env["INVENTIV_MACHINE_TAGS"]
    orphan = fleet.start_agent(template.cmdline(), env, str(tmp_path))
    orphan_started = time.monotonic()
    until(lambda: not alive(orphan.pid), 20, "orphan terminated by reconciliation")
    reaped = time.monotonic() - orphan_started
    print(f"orphan terminated {reaped:.1f} s after it started (grace 2 s, period 1 s)")
    assert reaped >= 2.0, "terminated before INVENTIV_ORPHAN_GRACE_S"
    # It was reconciliation that ended it (it would otherwise retry its register forever).
    until(lambda: f"terminated orphan machine {orphan_id}" in stack.log("orchestrator"), 5, "log")
    assert (orphan_state / "worker-id").exists()  # it did run as an agent
    until(lambda: not processes(lambda e: e.get("INVENTIV_MACHINE_ID") == orphan_id), 20, "engine")
    # The valid instance was left alone.
    assert stack.get_instance(keeper["id"])["status"] == "ready"
    assert one(keeper["id"], "agent").pid == template.pid  # type: ignore[union-attr]

    # The vanished machine: terminated with reason deleted_by_provider, tokens revoked.
    # Reconciliation believes a machine is gone only once it is missing from two listings in a
    # row, the first one a period after the instance's last state change; depending on timing
    # the watchdog may have marked it unreachable first.
    done = wait_status(stack, doomed["id"], "terminated", timeout=30)
    print(f"vanished machine's instance terminated {time.monotonic() - vanished_at:.1f} s later")
    last_two = state_changes(stack, doomed["id"])[-2:]
    assert last_two[0][0] in ("ready", "unreachable")
    assert [change[1:] for change in last_two] == [
        ("terminating", "deleted_by_provider"),
        ("terminated", "deleted_by_provider"),
    ]
    assert done["terminated_at"] is not None
    refused = heartbeat(stack, done, doomed_token)
    assert refused.status_code == 401 and refused.json()["error"] == "token_revoked", refused.text
    assert stack.get_instance(keeper["id"])["status"] == "ready"


def test_startup_timeout_fails_instance_and_refuses_its_bootstrap_token(fleet: Fleet) -> None:
    stack = fleet.stack(env={**FAST, "INVENTIV_STARTUP_TIMEOUT_S": "2"})
    created = stack.create_instance(provider="manual", model="echo")
    iid, bootstrap = created["id"], created["bootstrap_token"]
    assert bootstrap
    wait_status(stack, iid, "booting", timeout=10)
    failed = wait_status(stack, iid, "startup_failed", timeout=15)  # job runs every 5 s
    assert failed["error_code"] == "startup_timeout"
    assert "INVENTIV_STARTUP_TIMEOUT_S" in failed["error_message"]
    # The failed instance's machine is released and its tokens revoked.
    until(lambda: "machine_released" in [e["kind"] for e in stack.events(iid)], 10, "release")
    register = httpx.post(
        f"{stack.api_url}/internal/worker/register",
        json={"instance_id": iid, "worker_id": str(uuid.uuid4()), "agent_version": "test"},
        headers={"authorization": f"Bearer {bootstrap}"},
        timeout=10,
        trust_env=False,
    )
    assert register.status_code == 401, register.text
    assert register.json()["error"] == "token_revoked"
    assert stack.get_instance(iid)["status"] == "startup_failed"
