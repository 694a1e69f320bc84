"""The inference engine as a supervised child process: start it, tell when it serves the model,
restart it with backoff when it dies, and make sure it never outlives the agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import httpx
import psutil

from .backoff import Backoff
from .config import AgentConfig, EngineKind

log = logging.getLogger("inventiv.agent")

PID_FILE = "engine.pid"
PROBE_ACCESS_LOG = re.compile(rb'"GET /(?:metrics|v1/models) HTTP/[0-9.]+" 200')
TAIL_BYTES = 2000
# Secrets of the agent that the engine has no use for are not handed down to it.
SCRUBBED_ENV = ("INVENTIV_BOOTSTRAP_TOKEN",)


class EnginePhase(StrEnum):
    STARTING = "starting"
    READY = "ready"
    ERROR = "error"
    STOPPED = "stopped"


@dataclass(frozen=True)
class EngineSpec:
    """How to run one engine; `argv=None` means the agent does not manage a process at all."""

    argv: tuple[str, ...] | None
    port: int
    model_id: str | None = None
    api_key: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def display(self) -> str:
        """The command for logs, with the API key masked."""
        if self.argv is None:
            return "(not managed)"
        shown = list(self.argv)
        for i, word in enumerate(shown):
            if self.api_key and self.api_key in word:
                shown[i] = word.replace(self.api_key, "***")
        return " ".join(shown)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now; used when WORKER_ENGINE_PORT=0 asks the agent to choose."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def build_engine_spec(config: AgentConfig, port: int) -> EngineSpec:
    """The command line for WORKER_ENGINE, as documented in docs/agent.md."""
    model = config.model_id or ""
    key = config.engine_api_key
    argv: list[str] | None
    if config.engine is EngineKind.VLLM:
        argv = ["vllm", "serve", model, "--port", str(port)]
        if key:
            argv += ["--api-key", key]
    elif config.engine is EngineKind.ECHO:
        argv = [sys.executable, "-m", "inventiv.cli", "engine", "echo"]
        argv += ["--port", str(port), "--model", model]
        if key:
            argv += ["--api-key", key]
    elif config.engine is EngineKind.COMMAND:
        values = {"{port}": str(port), "{model}": model, "{api_key}": key or ""}
        argv = []
        for word in config.engine_command:
            for placeholder, value in values.items():
                word = word.replace(placeholder, value)
            argv.append(word)
    else:
        argv = None
    if argv is not None:
        argv += list(config.engine_args)
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(config.extra_engine_env)
    env["INSTANCE_ID"] = str(config.instance_id)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return EngineSpec(
        argv=tuple(argv) if argv is not None else None,
        port=port,
        model_id=config.model_id,
        api_key=key,
        env=env,
    )


async def model_listed(client: httpx.AsyncClient, spec: EngineSpec, timeout_s: float = 2.0) -> bool:
    """True when the engine's /v1/models lists our model (any model when none is configured)."""
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    try:
        response = await client.get(
            f"{spec.base_url}/v1/models", headers=headers, timeout=timeout_s
        )
        if response.status_code != 200:
            return False
        data = response.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
    if spec.model_id is None:
        return True
    return any(isinstance(m, dict) and m.get("id") == spec.model_id for m in data)


class EngineSupervisor:
    """Runs the engine in its own process group and keeps it running until stop().

    Its own process group (session) lets stop() reach the helpers vLLM forks too. Because a
    SIGKILLed agent cannot clean up, the engine's pid is also written to the state dir and a
    leftover engine from a previous agent is killed at start.
    """

    def __init__(
        self,
        spec: EngineSpec,
        http: httpx.AsyncClient,
        *,
        state_dir: Path,
        restart_base_s: float = 1.0,
        restart_cap_s: float = 60.0,
        crash_limit: int = 3,
        stop_timeout_s: float = 15.0,
        probe_interval_s: float = 1.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self.http = http
        self._pid_path = state_dir / PID_FILE
        self._backoff = Backoff(restart_base_s, restart_cap_s, jitter=False)
        self._crash_limit = max(1, crash_limit)
        self._stop_timeout_s = stop_timeout_s
        self._probe_interval_s = probe_interval_s
        self._on_change = on_change
        self._stopping = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._tail = bytearray()
        self._crashes = 0
        self.phase = EnginePhase.STARTING
        self.error: str | None = None
        self.restarts = 0
        self.started_at: float | None = None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def ready(self) -> bool:
        return self.phase is EnginePhase.READY

    def _set_phase(self, phase: EnginePhase, error: str | None = None) -> None:
        changed = phase is not self.phase or error != self.error
        self.phase, self.error = phase, error
        if changed and self._on_change is not None:
            self._on_change()

    async def run(self) -> None:
        """Supervise until stop(); returns only then."""
        if self.spec.argv is None:
            await self._watch_external()
            return
        self.kill_leftover()
        while not self._stopping.is_set():
            await self._run_once()
            if self._stopping.is_set():
                break
            delay = self._backoff.next_delay()
            log.warning("engine: restarting in %.1fs (restart #%d)", delay, self.restarts + 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if not self._stopping.is_set():
                self.restarts += 1
                if self._on_change is not None:
                    self._on_change()

    async def _run_once(self) -> None:
        """Start the engine, wait for it to serve the model, then wait for it to exit."""
        assert self.spec.argv is not None
        self._tail.clear()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.spec.argv,
                env=dict(self.spec.env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._crashed(f"cannot start engine `{self.spec.display()}`: {exc}")
            return
        self._proc = proc
        self.started_at = time.monotonic()
        self._write_pid(proc.pid)
        guard = await self._start_guard(proc.pid)
        log.info("engine started (pid %d): %s", proc.pid, self.spec.display())
        if self.phase is not EnginePhase.ERROR:
            self._set_phase(EnginePhase.STARTING)
        pump = asyncio.create_task(self._pump(proc))
        ready = asyncio.create_task(self._wait_ready(proc))
        try:
            code = await proc.wait()
        finally:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pump, 2.0)
            self._kill_group(proc.pid, signal.SIGKILL)  # helpers it left behind (GPU memory!)
            self._remove_pid()
            await self._stop_guard(guard)
        if self._stopping.is_set():
            return
        tail = self._tail.decode(errors="replace").strip().splitlines()[-5:]
        detail = f"; last output: {' | '.join(tail)}" if tail else ""
        self._crashed(f"engine exited with code {code}{detail}"[:2000])

    async def _start_guard(self, pgid: int) -> asyncio.subprocess.Process | None:
        """Start the watchdog that kills the engine's group if this agent dies abruptly."""
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "inventiv.agent.guard",
                str(pgid),
                str(self._stop_timeout_s),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            log.warning(
                "engine: no guard process (%s); a SIGKILLed agent may leave it running", exc
            )
            return None

    @staticmethod
    async def _stop_guard(guard: asyncio.subprocess.Process | None) -> None:
        if guard is None:
            return
        if guard.stdin is not None:
            guard.stdin.close()  # EOF: the guard finds the group already gone and exits
        try:
            await asyncio.wait_for(guard.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                guard.kill()
            await guard.wait()

    def _crashed(self, message: str) -> None:
        self._crashes += 1
        log.warning("%s", message)
        if self._crashes >= self._crash_limit:
            if self.phase is not EnginePhase.ERROR:
                log.error("engine keeps crashing (%d times in a row): status error", self._crashes)
            self._set_phase(EnginePhase.ERROR, message)
        else:
            self._set_phase(EnginePhase.STARTING)

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        while proc.returncode is None:
            if await model_listed(self.http, self.spec):
                assert self.started_at is not None
                took = time.monotonic() - self.started_at
                log.info(
                    "engine ready: %s listed on /v1/models after %.1fs",
                    self.spec.model_id or "a model",
                    took,
                )
                self._crashes = 0
                self._backoff.reset()
                self._set_phase(EnginePhase.READY)
                return
            await asyncio.sleep(self._probe_interval_s)

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        """Forward the engine's output to ours, keeping a short tail for the error report.

        Access-log lines of the agent's own probes (GET /metrics, GET /v1/models) are dropped:
        one per heartbeat would drown what the engine has to say.
        """
        assert proc.stdout is not None
        out = getattr(sys.stderr, "buffer", None)
        pending = b""
        while True:
            chunk = await proc.stdout.read(65536)
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if len(pending) > 65536:  # a huge line without newline: pass it on as is
                    lines.append(pending)
                    pending = b""
            else:
                lines, pending = ([pending] if pending else []), b""
            kept = b"".join(line + b"\n" for line in lines if not PROBE_ACCESS_LOG.search(line))
            if kept:
                self._tail += kept
                del self._tail[:-TAIL_BYTES]
                if out is not None:
                    with contextlib.suppress(OSError, ValueError):
                        out.write(kept)
                        out.flush()
            if not chunk:
                return

    async def _watch_external(self) -> None:
        """WORKER_ENGINE=none: nothing to run; follow an engine managed elsewhere, if any."""
        if self.spec.model_id is None:
            self._set_phase(EnginePhase.READY)
            await self._stopping.wait()
            return
        while not self._stopping.is_set():
            ready = await model_listed(self.http, self.spec)
            if ready != self.ready:
                log.info("engine (external) %s", "ready" if ready else "not ready")
                self._set_phase(EnginePhase.READY if ready else EnginePhase.STARTING)
            wait = self._probe_interval_s * (5 if ready else 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)

    async def stop(self) -> None:
        """SIGTERM the engine's group, wait up to the stop timeout, then SIGKILL."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            log.info("engine: stopping (pid %d)", proc.pid)
            self._kill_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self._stop_timeout_s)
            except TimeoutError:
                log.warning(
                    "engine: no exit %.0fs after SIGTERM, sending SIGKILL", self._stop_timeout_s
                )
                self._kill_group(proc.pid, signal.SIGKILL)
                await proc.wait()
            self._kill_group(proc.pid, signal.SIGKILL)
            self._remove_pid()
        self._set_phase(EnginePhase.STOPPED)

    def kill_now(self) -> None:
        """Last resort for interpreter exit: SIGKILL without waiting (no event loop needed)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self._kill_group(proc.pid, signal.SIGKILL)
            self._remove_pid()

    @staticmethod
    def _kill_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def _write_pid(self, pid: int) -> None:
        try:
            created = psutil.Process(pid).create_time()
            self._pid_path.write_text(f"{pid} {created}\n", encoding="utf-8")
        except (OSError, psutil.Error) as exc:
            log.debug("cannot record engine pid: %s", exc)

    def _remove_pid(self) -> None:
        with contextlib.suppress(OSError):
            self._pid_path.unlink()

    def kill_leftover(self) -> None:
        """Kill an engine left by an agent that died without cleaning up (e.g. SIGKILL)."""
        try:
            pid_text, created_text = self._pid_path.read_text(encoding="utf-8").split()
            pid, created = int(pid_text), float(created_text)
        except (OSError, ValueError):
            return
        try:
            same = abs(psutil.Process(pid).create_time() - created) < 0.01
        except psutil.NoSuchProcess:
            same = True  # leader gone; its group (if any is left) can only be that engine's
        except psutil.Error:
            same = False
        if same:
            log.warning("engine: killing the engine left by a previous agent (pgid %d)", pid)
            self._kill_group(pid, signal.SIGKILL)
        self._remove_pid()
