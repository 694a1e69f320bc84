"""Engine supervision with a toy engine: readiness from /v1/models, restart after a crash,
error status when it keeps crashing, and no engine (or engine helper) outliving stop()."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from inventiv.agent.config import AgentConfig, EngineKind
from inventiv.agent.engine import (
    PID_FILE,
    EnginePhase,
    EngineSpec,
    EngineSupervisor,
    build_engine_spec,
    free_port,
)
from inventiv.agent.metrics import scrape_engine_queue

# A stand-in for vLLM: /v1/models lists the model once "loaded", /metrics speaks vLLM's names.
# TOY_MODE: "crash" exits at once, "grandchild" forks a helper first (like vLLM's workers),
# "ignore_term" ignores SIGTERM. Every start appends "pid INSTANCE_ID" to TOY_DIR/launches.
TOY_ENGINE = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    port, model = int(sys.argv[1]), sys.argv[2]
    mode, toy_dir = os.environ.get("TOY_MODE", ""), os.environ["TOY_DIR"]
    with open(os.path.join(toy_dir, "launches"), "a") as f:
        f.write(f"{os.getpid()} {os.environ.get('INSTANCE_ID')}\\n")
    print("toy engine starting", flush=True)
    if mode == "crash":
        print('INFO:     127.0.0.1:1 - "GET /metrics HTTP/1.1" 200 OK', flush=True)
        print("RuntimeError: CUDA out of memory", flush=True)
        sys.exit(3)
    if mode == "grandchild":
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        with open(os.path.join(toy_dir, "helper"), "w") as f:
            f.write(str(helper.pid))
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    loaded_at = time.time() + float(os.environ.get("TOY_STARTUP_S", "0"))

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path == "/v1/models":
                data = [{"id": model}] if time.time() >= loaded_at else []
                body = json.dumps({"object": "list", "data": data}).encode()
            elif self.path == "/metrics":
                body = (
                    'vllm:num_requests_waiting{model_name="%s"} 5\\n'
                    'vllm:num_requests_running{model_name="%s"} 2\\n' % (model, model)
                ).encode()
            else:
                self.send_response(404); self.end_headers(); return
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    script = tmp_path / "toy_engine.py"
    script.write_text(TOY_ENGINE)
    return script


def _spec(toy: Path, tmp_path: Path, mode: str = "", model: str = "toy/model") -> EngineSpec:
    config = AgentConfig(
        instance_id=uuid.UUID(int=42),
        state_dir=tmp_path,
        control_plane_url="http://127.0.0.1:9",
        engine=EngineKind.COMMAND,
        model_id=model,
        engine_command=(sys.executable, str(toy), "{port}", "{model}"),
        extra_engine_env={"TOY_MODE": mode, "TOY_DIR": str(tmp_path)},
    ).check()
    return build_engine_spec(config, free_port())


def _supervisor(spec: EngineSpec, tmp_path: Path, **kw: float) -> EngineSupervisor:
    options: dict[str, float] = {
        "restart_base_s": 0.05,
        "restart_cap_s": 0.2,
        "crash_limit": 3,
        "stop_timeout_s": 3.0,
        "probe_interval_s": 0.05,
    }
    options.update(kw)
    return EngineSupervisor(
        spec,
        httpx.AsyncClient(),
        state_dir=tmp_path,
        **options,  # type: ignore[arg-type]
    )


async def _until(predicate: object, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def _launches(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "launches"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def test_engine_ready_then_restarted_after_a_crash(toy: Path, tmp_path: Path) -> None:
    spec = _spec(toy, tmp_path)
    changes: list[EnginePhase] = []
    sup = _supervisor(spec, tmp_path)
    sup._on_change = lambda: changes.append(sup.phase)
    task = asyncio.create_task(sup.run())
    try:
        await _until(lambda: sup.ready)
        first_pid = sup.pid
        assert first_pid is not None
        assert _launches(tmp_path) == [[str(first_pid), str(uuid.UUID(int=42))]]  # INSTANCE_ID
        assert (tmp_path / PID_FILE).read_text().split()[0] == str(first_pid)
        assert await scrape_engine_queue(sup.http, spec.base_url, None) == (5, 2)

        os.kill(first_pid, signal.SIGKILL)  # the engine dies under the agent
        await _until(lambda: sup.restarts == 1 and sup.ready and sup.pid != first_pid)
        assert len(_launches(tmp_path)) == 2
        assert EnginePhase.STARTING in changes[1:]  # not ready while it reloads
        assert sup.error is None
    finally:
        await sup.stop()
        await asyncio.wait_for(task, 5)
        await sup.http.aclose()
    assert sup.phase is EnginePhase.STOPPED
    assert not (tmp_path / PID_FILE).exists()


async def test_model_not_listed_is_not_ready(toy: Path, tmp_path: Path) -> None:
    spec = _spec(toy, tmp_path)
    wrong = EngineSpec(spec.argv, spec.port, "other/model", None, spec.env)
    sup = _supervisor(wrong, tmp_path)
    task = asyncio.create_task(sup.run())
    try:
        await _until(lambda: sup.pid is not None and len(_launches(tmp_path)) == 1)
        await asyncio.sleep(0.5)
        assert sup.phase is EnginePhase.STARTING
    finally:
        await sup.stop()
        await asyncio.wait_for(task, 5)
        await sup.http.aclose()


async def test_crash_loop_becomes_error_with_the_engine_output(toy: Path, tmp_path: Path) -> None:
    sup = _supervisor(_spec(toy, tmp_path, mode="crash"), tmp_path)
    task = asyncio.create_task(sup.run())
    try:
        await _until(lambda: sup.phase is EnginePhase.ERROR)
        assert sup.error is not None
        assert "code 3" in sup.error and "CUDA out of memory" in sup.error
        assert "GET /metrics" not in sup.error  # the agent's own probes are not news
        assert len(_launches(tmp_path)) == 3  # crash_limit
        await _until(lambda: len(_launches(tmp_path)) >= 4)  # and it keeps trying
    finally:
        await sup.stop()
        await asyncio.wait_for(task, 5)
        await sup.http.aclose()


async def test_missing_engine_binary_is_reported(tmp_path: Path) -> None:
    spec = EngineSpec(("/nonexistent/vllm", "serve"), free_port(), "m", None, {})
    sup = _supervisor(spec, tmp_path, crash_limit=1)
    task = asyncio.create_task(sup.run())
    try:
        await _until(lambda: sup.phase is EnginePhase.ERROR)
        assert sup.error is not None and "cannot start engine" in sup.error
    finally:
        await sup.stop()
        await asyncio.wait_for(task, 5)
        await sup.http.aclose()


async def test_stop_kills_the_whole_process_group(toy: Path, tmp_path: Path) -> None:
    sup = _supervisor(_spec(toy, tmp_path, mode="grandchild"), tmp_path)
    task = asyncio.create_task(sup.run())
    await _until(lambda: sup.ready and (tmp_path / "helper").exists())
    engine_pid = sup.pid
    helper = int((tmp_path / "helper").read_text())
    assert psutil.pid_exists(helper)
    await sup.stop()
    await asyncio.wait_for(task, 5)
    await sup.http.aclose()
    await _until(lambda: not _alive(helper), 5)
    assert engine_pid is not None and not _alive(engine_pid)


async def test_stop_escalates_to_sigkill(toy: Path, tmp_path: Path) -> None:
    sup = _supervisor(_spec(toy, tmp_path, mode="ignore_term"), tmp_path, stop_timeout_s=0.5)
    task = asyncio.create_task(sup.run())
    await _until(lambda: sup.ready)
    pid = sup.pid
    started = time.monotonic()
    await sup.stop()
    await asyncio.wait_for(task, 5)
    await sup.http.aclose()
    assert time.monotonic() - started < 3
    assert pid is not None and not _alive(pid)


def test_leftover_engine_of_a_killed_agent_is_killed(toy: Path, tmp_path: Path) -> None:
    spec = _spec(toy, tmp_path)
    assert spec.argv is not None
    proc = subprocess.Popen(spec.argv, env=dict(spec.env), start_new_session=True)
    try:
        created = psutil.Process(proc.pid).create_time()
        (tmp_path / PID_FILE).write_text(f"{proc.pid} {created}\n")
        sup = _supervisor(spec, tmp_path)
        sup.kill_leftover()
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert not (tmp_path / PID_FILE).exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_leftover_check_spares_a_reused_pid(tmp_path: Path) -> None:
    # Our own pid with a wrong start time: a pid the OS reused for an unrelated process.
    (tmp_path / PID_FILE).write_text(f"{os.getpid()} 12345.0\n")
    spec = EngineSpec(None, 1)
    EngineSupervisor(spec, httpx.AsyncClient(), state_dir=tmp_path).kill_leftover()
    assert not (tmp_path / PID_FILE).exists()  # and we are still alive to assert it


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
