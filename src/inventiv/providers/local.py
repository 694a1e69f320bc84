"""Workers on this machine: each "machine" is an agent process (which runs its engine) on free
loopback ports, with its own state directory.

The agent gets the control-plane URL and its bootstrap token exactly as a cloud VM would (in its
environment and a token file), plus INSTANCE_ID, INVENTIV_MACHINE_ID and INVENTIV_MACHINE_TAGS in
every process's environment, so `ps e`/`/proc/<pid>/environ` find a worker's processes and the
provider lists its machines by tag from the process table itself: what it started survives a
control-plane restart, and a tagged process no record knows shows up as an orphan.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from inventiv.config import Settings, write_private_file
from inventiv.providers.base import (
    Machine,
    MachineSpec,
    MachineState,
    Offer,
    ProviderError,
    WorkerBoot,
)

MACHINE_ID_ENV = "INVENTIV_MACHINE_ID"
MACHINE_TAGS_ENV = "INVENTIV_MACHINE_TAGS"
KILL_AFTER_S = 10.0


def agent_processes() -> list[tuple[psutil.Process, dict[str, str]]]:
    """Agent processes started by a local provider (any stack), with their environments.

    The engine and the agent's guard inherit the agent's environment, so the command line tells
    the agent itself apart (`... -m inventiv.cli worker`)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline[-1:] != ["worker"]:
            continue
        try:
            env = proc.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
            continue
        if MACHINE_ID_ENV in env and env.get("INVENTIV_LOCAL_ROLE") == "agent":
            found.append((proc, env))
    return found


def spawn_agent(env: dict[str, str], state_dir: Path) -> subprocess.Popen[bytes]:
    with (state_dir / "agent.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "inventiv.cli", "worker"],
            env=env,
            cwd=state_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: terminate() signals it whole
        )


class LocalProvider:
    name = "local"
    can_list = True

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._root = settings.data_dir / "workers"
        self._term_sent: dict[str, float] = {}
        self._children: list[subprocess.Popen[bytes]] = []

    def _reap(self) -> None:
        """Collect exited agents started by this process, so none lingers as a zombie."""
        self._children = [c for c in self._children if c.poll() is None]

    def _dir(self, provider_id: str) -> Path:
        return self._root / provider_id

    async def create(self, spec: MachineSpec, boot: WorkerBoot) -> Machine:
        provider_id = f"local-{spec.instance_id}"
        state_dir = self._dir(provider_id)
        state_dir.mkdir(parents=True, exist_ok=True)
        token_file = state_dir / "bootstrap-token"
        write_private_file(token_file, boot.bootstrap_token + "\n")
        env = {
            **os.environ,
            **boot.agent_env(),
            "INVENTIV_BOOTSTRAP_TOKEN_FILE": str(token_file),
            "WORKER_STATE_DIR": str(state_dir),
            "WORKER_ENGINE_PORT": "0",
            "WORKER_HEALTH_PORT": "0",
            "WORKER_HEALTH_HOST": "127.0.0.1",
            "WORKER_ADVERTISE_ADDRESS": "127.0.0.1",
            MACHINE_ID_ENV: provider_id,
            MACHINE_TAGS_ENV: ",".join(spec.tags),
            "INVENTIV_LOCAL_ROLE": "agent",
        }
        env.pop("INVENTIV_BOOTSTRAP_TOKEN", None)  # the file is the only copy on the machine
        for key in ("DATABASE_URL", "INVENTIV_ADMIN_TOKEN", "SCW_SECRET_KEY", "SCW_ACCESS_KEY"):
            env.pop(key, None)  # a worker gets no control-plane secret
        if spec.engine_args:
            env["WORKER_ENGINE_ARGS"] = spec.engine_args
        try:
            child = await asyncio.to_thread(spawn_agent, env, state_dir)
        except OSError as exc:
            raise ProviderError("spawn_failed", f"Could not start the agent: {exc}.") from exc
        self._children.append(child)
        return Machine(provider_id, MachineState.RUNNING, address="127.0.0.1", tags=spec.tags)

    def _processes(self, provider_id: str) -> list[psutil.Process]:
        self._reap()
        return [p for p, env in agent_processes() if env.get(MACHINE_ID_ENV) == provider_id]

    async def get(self, provider_id: str) -> Machine:
        if await asyncio.to_thread(self._processes, provider_id):
            state = MachineState.RUNNING
        elif self._dir(provider_id).exists():
            state = MachineState.STOPPED  # the agent died; its "machine" (state dir) remains
        else:
            state = MachineState.GONE
        return Machine(provider_id, state, address="127.0.0.1")

    async def terminate(self, provider_id: str) -> None:
        """Stop the agent's process group (the agent stops its engine), SIGKILL after a delay;
        the machine is gone once no process is left and its state directory is removed."""
        processes = await asyncio.to_thread(self._processes, provider_id)
        now = time.monotonic()
        first = self._term_sent.setdefault(provider_id, now)
        sig = signal.SIGKILL if now - first > KILL_AFTER_S else signal.SIGTERM
        for proc in processes:
            try:
                os.killpg(os.getpgid(proc.pid), sig)
            except (ProcessLookupError, PermissionError):
                continue
        if not processes:
            self._term_sent.pop(provider_id, None)
            shutil.rmtree(self._dir(provider_id), ignore_errors=True)

    async def list_tagged(self, tag: str) -> list[Machine]:
        self._reap()
        machines: dict[str, Machine] = {}
        for _, env in await asyncio.to_thread(agent_processes):
            tags = tuple(t for t in env.get(MACHINE_TAGS_ENV, "").split(",") if t)
            if tag in tags:
                provider_id = env[MACHINE_ID_ENV]
                machines[provider_id] = Machine(provider_id, MachineState.RUNNING, tags=tags)
        if self._root.exists():
            for path in self._root.iterdir():
                if path.is_dir() and path.name not in machines:
                    machines[path.name] = Machine(path.name, MachineState.STOPPED, tags=(tag,))
        return list(machines.values())

    async def catalog(self) -> list[Offer]:
        return [Offer("local", "localhost", 0, None, None, 0.0)]

    async def close(self) -> None:
        return None
