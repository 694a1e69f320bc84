"""The agent's control loop against a scripted fake control plane (httpx.MockTransport):
bootstrap exchange, re-registration on 401, exits on revoked/gone/terminate, drain, URL
changes (file re-read, heartbeat field, pushed), 503 backoff and the dead-man switch."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from inventiv.agent.config import AgentConfig, EngineKind
from inventiv.agent.loop import EXIT_AUTH, EXIT_OK, EXIT_ORPHAN, Agent
from inventiv.protocol import (
    HEARTBEAT_PATH,
    REGISTER_PATH,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WorkerStatus,
    hash_token,
    sign_control_request,
)

INSTANCE = uuid.UUID("11111111-2222-4333-8444-555555555555")
BOOT = "ivt_boot_bootstrap"
WORKER = "ivt_work_worker"

Rule = Callable[[httpx.Request], httpx.Response | None]


@dataclass
class FakeControlPlane:
    """Accepts BOOT once (exchanging it for WORKER) and WORKER afterwards, like the orchestrator;
    `rules` run first and may answer a request differently (errors, URL changes...)."""

    up_hosts: set[str] = field(default_factory=lambda: {"cp.localhost"})
    interval: float = 0.05
    desired: str = "run"
    push_url: str | None = None
    revoked: bool = False
    bootstrap_used: bool = False
    worker_tokens: set[str] = field(default_factory=set)
    calls: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        body = json.loads(request.content or b"{}")
        self.calls.append((request.url.host, request.url.path, token, body))
        if request.url.host not in self.up_hosts:
            raise httpx.ConnectError("connection refused", request=request)
        for rule in self.rules:
            answer = rule(request)
            if answer is not None:
                return answer
        if self.revoked:
            return _err(401, "token_revoked")
        if request.url.path == REGISTER_PATH:
            if token == BOOT:
                if self.bootstrap_used:
                    return _err(401, "bootstrap_token_used")
                self.bootstrap_used = True
                self.worker_tokens = {WORKER}
                return httpx.Response(
                    200,
                    json={"worker_token": WORKER, "heartbeat_interval_s": self.interval,
                          "status": "starting", "protocol_version": 1, "future_field": 1},
                )  # fmt: skip
            if token in self.worker_tokens:
                return httpx.Response(
                    200, json={"heartbeat_interval_s": self.interval, "status": "starting"}
                )
            return _err(401, "invalid_token")
        if request.url.path == HEARTBEAT_PATH:
            if token not in self.worker_tokens:
                return _err(401, "invalid_token")
            payload: dict[str, Any] = {
                "heartbeat_interval_s": self.interval,
                "desired_state": self.desired,
            }
            if self.push_url:
                payload["control_plane_url"] = self.push_url
            return httpx.Response(200, json=payload)
        return _err(404, "not_found")

    def of(self, path: str) -> list[tuple[str, str, str, dict[str, Any]]]:
        return [c for c in self.calls if c[1] == path]


def _err(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": code, "message": f"{code}."}, headers=headers)


def _config(tmp_path: Path, **kw: Any) -> AgentConfig:
    options: dict[str, Any] = {
        "instance_id": INSTANCE,
        "state_dir": tmp_path / "state",
        "control_plane_url": "http://cp.localhost",
        "bootstrap_token": BOOT,
        "engine": EngineKind.NONE,
        "health_host": "127.0.0.1",
        "health_port": 0,
        "retry_base_s": 0.01,
        "retry_cap_s": 0.05,
    }
    options.update(kw)
    return AgentConfig(**options)


def _agent(cp: FakeControlPlane, config: AgentConfig) -> Agent:
    return Agent(
        config,
        transport=httpx.MockTransport(cp.handler),
        rng=random.Random(0),
        install_signal_handlers=False,
    )


async def _until(predicate: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def _stop(agent: Agent, task: asyncio.Task[int]) -> int:
    agent.request_stop("test over")
    return await asyncio.wait_for(task, 5)


async def test_bootstrap_then_heartbeats_then_restart_uses_worker_token(tmp_path: Path) -> None:
    cp = FakeControlPlane()
    agent = _agent(cp, _config(tmp_path))
    task = asyncio.create_task(agent.run())
    await _until(lambda: len(cp.of(HEARTBEAT_PATH)) >= 3)
    assert await _stop(agent, task) == EXIT_OK

    register = cp.of(REGISTER_PATH)
    assert len(register) == 1 and register[0][2] == BOOT
    body = register[0][3]
    assert body["instance_id"] == str(INSTANCE)
    assert body["health_port"] == agent.health_port
    assert body["gpus"] == [] and body["host"]["cpu_count"] >= 1  # no GPU here: none invented
    beats = cp.of(HEARTBEAT_PATH)
    assert all(c[2] == WORKER for c in beats)
    seqs = [c[3]["seq"] for c in beats]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert beats[-1][3]["status"] == "ready"  # engine "none" without a model: ready at once
    assert beats[-1][3]["system"]["memory_total_mb"] > 0
    token_file = tmp_path / "state" / "worker-token"
    assert token_file.read_text().strip() == WORKER
    worker_id = body["worker_id"]

    # Restart: the stored worker token is used, not the (now used) bootstrap token.
    cp.calls.clear()
    agent = _agent(cp, _config(tmp_path))
    task = asyncio.create_task(agent.run())
    await _until(lambda: len(cp.of(HEARTBEAT_PATH)) >= 1)
    assert await _stop(agent, task) == EXIT_OK
    register = cp.of(REGISTER_PATH)
    assert [c[2] for c in register] == [WORKER]
    assert register[0][3]["worker_id"] == worker_id  # same worker id across restarts


async def test_refused_worker_token_falls_back_to_bootstrap(tmp_path: Path) -> None:
    cp = FakeControlPlane()
    agent = _agent(cp, _config(tmp_path))
    task = asyncio.create_task(agent.run())
    await _until(lambda: len(cp.of(HEARTBEAT_PATH)) >= 1)
    # The control plane forgets the worker token but offers a fresh bootstrap exchange.
    cp.worker_tokens = set()
    cp.bootstrap_used = False
    await _until(lambda: len(cp.of(REGISTER_PATH)) == 2 and agent.state.registered)
    assert [c[2] for c in cp.of(REGISTER_PATH)] == [BOOT, BOOT]
    await _until(lambda: cp.of(HEARTBEAT_PATH)[-1][2] == WORKER and agent.state.heartbeats_ok > 1)
    assert await _stop(agent, task) == EXIT_OK


async def test_every_token_refused_exits_with_auth_code(tmp_path: Path) -> None:
    cp = FakeControlPlane(bootstrap_used=True)
    agent = _agent(cp, _config(tmp_path))
    assert await asyncio.wait_for(agent.run(), 5) == EXIT_AUTH
    assert [c[2] for c in cp.of(REGISTER_PATH)] == [BOOT]  # refused once, not hammered


@pytest.mark.parametrize(
    ("answer", "when"),
    [
        (lambda: _err(401, "token_revoked"), "heartbeat"),
        (lambda: _err(404, "instance_not_found"), "heartbeat"),
        (lambda: _err(409, "instance_terminating"), "register"),
    ],
)
async def test_instance_gone_stops_and_exits_cleanly(
    tmp_path: Path, answer: Callable[[], httpx.Response], when: str
) -> None:
    cp = FakeControlPlane()
    path = HEARTBEAT_PATH if when == "heartbeat" else REGISTER_PATH
    cp.rules.append(lambda r: answer() if r.url.path == path else None)
    agent = _agent(cp, _config(tmp_path))
    assert await asyncio.wait_for(agent.run(), 5) == EXIT_OK
    assert len(cp.of(path)) == 1  # no retry loop against a dead instance


async def test_desired_state_drain_then_terminate(tmp_path: Path) -> None:
    cp = FakeControlPlane(desired="drain")
    agent = _agent(cp, _config(tmp_path))
    task = asyncio.create_task(agent.run())
    await _until(lambda: any(c[3].get("status") == "draining" for c in cp.of(HEARTBEAT_PATH)))
    assert agent.state.status is WorkerStatus.DRAINING
    cp.desired = "terminate"
    assert await asyncio.wait_for(task, 5) == EXIT_OK


async def test_unreachable_url_file_reread_and_recovery(tmp_path: Path, caplog: Any) -> None:
    url_file = tmp_path / "url"
    url_file.write_text("http://old.localhost\n")
    cp = FakeControlPlane(up_hosts={"new.localhost"})
    agent = _agent(cp, _config(tmp_path, control_plane_url=None, control_plane_url_file=url_file))
    caplog.set_level("INFO", logger="inventiv.agent")
    task = asyncio.create_task(agent.run())
    await _until(lambda: len(cp.calls) >= 3)
    assert not agent.state.registered
    assert agent.state.unreachable_since is not None
    url_file.write_text("http://new.localhost\n")  # the tunnel came back under a new name
    await _until(lambda: agent.state.heartbeats_ok >= 2)
    assert cp.of(REGISTER_PATH)[-1][0] == "new.localhost"
    assert agent.state.unreachable_since is None and agent.state.url_changes == 1
    assert await _stop(agent, task) == EXIT_OK
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable since" in m for m in messages) == 1  # one line, not one per retry
    assert sum("reachable again" in m for m in messages) == 1
    assert sum("URL changed" in m for m in messages) == 1


async def test_heartbeat_url_field_is_adopted(tmp_path: Path) -> None:
    cp = FakeControlPlane(
        up_hosts={"cp.localhost", "moved.localhost"}, push_url="http://moved.localhost"
    )
    url_file = tmp_path / "url"
    url_file.write_text("http://cp.localhost\n")
    agent = _agent(cp, _config(tmp_path, control_plane_url=None, control_plane_url_file=url_file))
    task = asyncio.create_task(agent.run())
    await _until(lambda: any(c[0] == "moved.localhost" for c in cp.of(HEARTBEAT_PATH)))
    assert url_file.read_text().strip() == "http://moved.localhost"
    cp.push_url = "http://evil.example.com"  # breaks https_required: ignored
    await _until(lambda: agent.state.heartbeats_ok >= 6)
    assert agent.urls.current == "http://moved.localhost"
    assert await _stop(agent, task) == EXIT_OK


async def test_503_backs_off_and_counts_failures(tmp_path: Path) -> None:
    cp = FakeControlPlane()
    failures = {"left": 3}

    def flaky(request: httpx.Request) -> httpx.Response | None:
        if request.url.path == HEARTBEAT_PATH and failures["left"] > 0:
            failures["left"] -= 1
            return _err(503, "orchestrator_unreachable", {"retry-after": "0"})
        return None

    cp.rules.append(flaky)
    agent = _agent(cp, _config(tmp_path))
    task = asyncio.create_task(agent.run())
    await _until(lambda: agent.state.heartbeats_ok >= 1)
    assert agent.state.heartbeat_failures == 3
    assert len(cp.of(REGISTER_PATH)) == 1  # 503 is not a reason to re-register
    assert await _stop(agent, task) == EXIT_OK


async def test_dead_man_switch_runs_shutdown_command(tmp_path: Path) -> None:
    cp = FakeControlPlane(up_hosts=set())
    marker = tmp_path / "shutdown-ran"
    config = _config(tmp_path, orphan_shutdown_s=0.3, shutdown_command=f"echo bye > '{marker}'")
    agent = _agent(cp, config)
    started = time.monotonic()
    assert await asyncio.wait_for(agent.run(), 5) == EXIT_ORPHAN
    assert 0.3 <= time.monotonic() - started < 3
    assert marker.read_text().strip() == "bye"


async def test_no_dead_man_switch_by_default(tmp_path: Path) -> None:
    cp = FakeControlPlane(up_hosts=set())
    agent = _agent(cp, _config(tmp_path))
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(0.5)
    assert not task.done()
    assert await _stop(agent, task) == EXIT_OK


async def test_pushed_url_over_real_health_port(tmp_path: Path) -> None:
    cp = FakeControlPlane(up_hosts={"cp.localhost", "pushed.localhost"})
    agent = _agent(cp, _config(tmp_path))
    task = asyncio.create_task(agent.run())
    await _until(lambda: agent.state.heartbeats_ok >= 1)
    body = json.dumps({"control_plane_url": "http://pushed.localhost"}).encode()
    stamp = f"{time.time():.3f}"
    signature = sign_control_request(hash_token(WORKER), stamp, body)
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"http://127.0.0.1:{agent.health_port}/control/url",
            content=body,
            headers={TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: signature},
        )
        assert response.status_code == 200, response.text
        await _until(lambda: cp.of(HEARTBEAT_PATH)[-1][0] == "pushed.localhost")
        ready = await client.get(f"http://127.0.0.1:{agent.health_port}/readyz")
        assert ready.status_code == 200
    assert await _stop(agent, task) == EXIT_OK
