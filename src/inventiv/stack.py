"""Run one stack (orchestrator + API for one PORT_OFFSET) as supervised background processes.

`inventiv up` starts a detached supervisor; the supervisor starts both services, restarts a
crashed one with backoff, and stops both on SIGTERM. Pid files and logs live in the stack's own
data directory, so stacks with different PORT_OFFSETs never touch each other.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from inventiv.config import Settings

SERVICES = ("orchestrator", "api")
START_TIMEOUT_S = 60.0
STABLE_AFTER_S = 60.0


@dataclass(frozen=True)
class StackPaths:
    run_dir: Path
    log_dir: Path

    @classmethod
    def of(cls, settings: Settings) -> StackPaths:
        run_dir = settings.data_dir / "run"
        log_dir = settings.data_dir / "logs"
        run_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        return cls(run_dir, log_dir)

    @property
    def supervisor_pid(self) -> Path:
        return self.run_dir / "supervisor.pid"

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"


class StackError(Exception):
    """Starting or stopping failed; the message says what to do."""


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def port_free(port: int) -> bool:
    """Whether a loopback port can be bound now: a port in TIME_WAIT is fine (SO_REUSEADDR), one
    that anything holds, listening or not, is not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def probe(settings: Settings) -> dict[str, str]:
    """What answers right now: the API (`GET /`) and the orchestrator as the API sees it."""
    try:
        response = httpx.get(settings.api_local_url + "/", timeout=2.0, trust_env=False)
        payload = response.json()
        return {"api": "ok", "orchestrator": payload.get("orchestrator", "unknown")}
    except (httpx.HTTPError, ValueError):
        pass
    try:
        httpx.get(settings.orchestrator_url + "/healthz", timeout=2.0, trust_env=False)
        return {"api": "down", "orchestrator": "ok"}
    except httpx.HTTPError:
        return {"api": "down", "orchestrator": "down"}


def service_command(name: str) -> list[str]:
    return [sys.executable, "-m", "inventiv.cli", "serve", name]


def start_stack(
    settings: Settings,
    progress: Callable[[str], None] = lambda _: None,
    timeout_s: float = START_TIMEOUT_S,
) -> bool:
    """Start the supervisor in the background unless it runs; wait until both services answer.

    Returns True when this call started it, False when it was already running.
    """
    paths = StackPaths.of(settings)
    started = False
    if read_pid(paths.supervisor_pid) is None:
        for port, what in (
            (settings.api_port, "API"),
            (settings.orchestrator_port, "orchestrator"),
        ):
            if port_in_use(port):
                if unnamed_stack_processes(settings):
                    raise StackError(
                        f"An Inventiv stack already serves port {port} (PORT_OFFSET="
                        f"{settings.port_offset}) but its pid file in {settings.data_dir} is "
                        "gone (data directory deleted while it ran?); run `inventiv down` "
                        "with the same PORT_OFFSET, then `inventiv up`."
                    )
                raise StackError(
                    f"Port {port} (the {what} port for PORT_OFFSET={settings.port_offset}) is "
                    "already used by another program; stop it or choose another PORT_OFFSET."
                )
        with paths.log("supervisor").open("ab") as log:
            subprocess.Popen(
                [sys.executable, "-m", "inventiv.cli", "supervise"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=os.environ.copy(),
            )
        started = True
    wait_until_healthy(settings, paths, progress, timeout_s)
    return started


def wait_until_healthy(
    settings: Settings,
    paths: StackPaths,
    progress: Callable[[str], None],
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        state = probe(settings)
        if state == {"api": "ok", "orchestrator": "ok"}:
            return
        text = f"api {state['api']}, orchestrator {state['orchestrator']}"
        if text != last:
            progress(f"waiting: {text}")
            last = text
        if time.monotonic() > deadline:
            raise StackError(
                f"The stack did not become healthy within {timeout_s:g} s ({text}). See the "
                f"logs in {paths.log_dir}."
            )
        time.sleep(0.2)


def unnamed_stack_processes(settings: Settings) -> list[psutil.Process]:
    """This stack's processes when no pid file names them: Inventiv services listening on its
    ports, and the supervisor above them (the data directory was deleted or moved while the
    stack ran, e.g. to start afresh)."""
    ports = {settings.api_port, settings.orchestrator_port}
    found: dict[int, psutil.Process] = {}
    try:
        sockets = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return []
    for conn in sockets:
        if conn.status != psutil.CONN_LISTEN or conn.pid is None or conn.laddr.port not in ports:
            continue
        try:
            service = psutil.Process(conn.pid)
            if not _is_inventiv(service, "serve"):
                continue
            parent = service.parent()
            owner = parent if parent is not None and _is_inventiv(parent, "supervise") else service
        except psutil.Error:
            continue
        found[owner.pid] = owner
    return list(found.values())


def _is_inventiv(process: psutil.Process, command: str) -> bool:
    cmdline = process.cmdline()
    return command in cmdline and any("inventiv" in part for part in cmdline)


def stop_stack(settings: Settings, timeout_s: float = 20.0) -> bool:
    """Stop the supervisor and its services; False when nothing was running."""
    paths = StackPaths.of(settings)
    pid = read_pid(paths.supervisor_pid)
    if pid is None:
        return _stop_processes(unnamed_stack_processes(settings), timeout_s)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if read_pid(paths.supervisor_pid) is None:
            return True
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    paths.supervisor_pid.unlink(missing_ok=True)
    return True


def _stop_processes(processes: list[psutil.Process], timeout_s: float) -> bool:
    if not processes:
        return False
    for process in processes:
        try:
            process.terminate()  # a supervisor stops its services on SIGTERM
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        process.kill()
    return True


def supervise(settings: Settings) -> int:
    """Run both services, restart a crashed one with backoff, stop both on SIGTERM/SIGINT."""
    paths = StackPaths.of(settings)
    paths.supervisor_pid.write_text(f"{os.getpid()}\n")
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    children: dict[str, subprocess.Popen[bytes]] = {}
    backoff = dict.fromkeys(SERVICES, 0.5)
    next_start = dict.fromkeys(SERVICES, 0.0)
    started_at = dict.fromkeys(SERVICES, 0.0)
    try:
        while not stopping:
            now = time.monotonic()
            for name in SERVICES:
                child = children.get(name)
                if child is not None and child.poll() is None:
                    continue
                if child is not None:
                    print(f"{name} exited with {child.returncode}; restarting", flush=True)
                    # A service that ran for a while before crashing starts the backoff over.
                    ran = now - started_at[name]
                    backoff[name] = 0.5 if ran > STABLE_AFTER_S else min(backoff[name] * 2, 30.0)
                    next_start[name] = now + backoff[name]
                    children.pop(name)
                if now >= next_start[name]:
                    with paths.log(name).open("ab") as log:
                        children[name] = subprocess.Popen(
                            service_command(name), stdout=log, stderr=subprocess.STDOUT
                        )
                    started_at[name] = now
            time.sleep(0.2)
    finally:
        for child in children.values():
            child.terminate()
        for child in children.values():
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        paths.supervisor_pid.unlink(missing_ok=True)
    return 0
