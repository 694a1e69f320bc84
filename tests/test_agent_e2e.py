"""`inventiv worker` as a real process against a real control plane (the `stack` fixture):
bootstrap -> ready, engine crash -> restarted, agent restart -> worker token, URL file change
(through a self-signed TLS "tunnel") -> followed, DELETE -> agent exits and takes the engine."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from inventiv.agent.metrics import parse_prometheus
from tests.conftest import free_port
from tests.fake_cloudflared.fake_cloudflared import ensure_certificate
from tests.fake_cloudflared.helpers import wait_for

HEARTBEAT_S = "0.3"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class AgentProcess:
    """One `python -m inventiv.cli worker` with its own state dir, ports and log file."""

    def __init__(self, tmp: Path, agent_env: dict[str, str], **extra: str) -> None:
        self.state_dir = tmp / "worker-state"
        self.health_port = free_port()
        self.log_path = tmp / "agent.log"
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("WORKER_", "INVENTIV_")) and k != "INSTANCE_ID"
        }
        self.env = {
            **base,
            **agent_env,
            "WORKER_STATE_DIR": str(self.state_dir),
            "WORKER_ENGINE_PORT": "0",
            "WORKER_HEALTH_HOST": "127.0.0.1",
            "WORKER_HEALTH_PORT": str(self.health_port),
            **extra,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "inventiv.cli", "worker"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        try:
            response = httpx.get(f"http://127.0.0.1:{self.health_port}/metrics", timeout=2)
        except httpx.HTTPError:
            return {}
        return parse_prometheus(response.text)

    def engine_pid(self) -> int | None:
        try:
            return int((self.state_dir / "engine.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def kill_all(self) -> None:
        """Teardown safety net: never leave an agent or an engine behind a failed test."""
        pid = self.engine_pid()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if pid is not None and _alive(pid):
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        print(f"--- agent log {agent.log_path}\n{agent.log()[-4000:]}")  # shown on failure
        agent.kill_all()


# --------------------------------------------------------------------------- TLS "tunnel"


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, the stand-in tunnel's: (cert.pem, key.pem)."""
    return ensure_certificate(tmp / "tunnel.pem")


class TlsProxy:
    """Terminates TLS on 127.0.0.1:<port> and forwards to the API, like a tunnel would; close()
    cuts every connection, like a tunnel that went away."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self.target_port = target_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"https://127.0.0.1:{self.port}"
        self.connections = 0
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            if self._closed:
                raw.close()
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            raw.close()
            return
        self.connections += 1
        self._sockets += [client, upstream]
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.listener.close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass


# --------------------------------------------------------------------------- tests


def test_worker_lifecycle(stack_factory: Any, tmp_path: Path, agents: list[Any]) -> None:
    stack = stack_factory(env={"INVENTIV_HEARTBEAT_INTERVAL_S": HEARTBEAT_S})
    instance = stack.create_instance(provider="manual", model="echo")
    iid = instance["id"]
    agent = AgentProcess(tmp_path, instance["agent_env"])
    agents.append(agent)
    agent.start()

    # Bootstrap registration -> heartbeats -> the echo engine lists the model -> ready.
    ready = stack.wait_status(iid, "ready", timeout=30)
    assert ready["worker_id"] and ready["health_port"] == agent.health_port
    token_file = agent.state_dir / "worker-token"
    assert token_file.read_text().startswith("ivt_")
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    seq = stack.get_instance(iid)["heartbeat_seq"] or 0
    wait_for(lambda: (stack.get_instance(iid)["heartbeat_seq"] or 0) > seq + 2, what="heartbeats")
    assert httpx.get(f"http://127.0.0.1:{agent.health_port}/readyz").status_code == 200
    assert stack.get_instance(iid)["metrics"]["gpus"] == []  # no GPU here, none invented

    # The engine dies: the agent restarts it and the instance is ready again.
    first_engine = agent.engine_pid()
    assert first_engine is not None
    os.kill(first_engine, signal.SIGKILL)
    wait_for(
        lambda: (
            agent.metrics().get("inventiv_agent_engine_restarts_total") == 1
            and agent.metrics().get("inventiv_agent_engine_ready") == 1
        ),
        what="engine restarted and ready",
    )
    assert agent.engine_pid() not in (None, first_engine)
    stack.wait_status(iid, "ready", timeout=20)

    # Agent restart: SIGTERM stops it and its engine; the new one uses the stored worker token.
    second_engine = agent.engine_pid()
    assert second_engine is not None
    assert agent.terminate() == 0
    assert not _alive(second_engine)
    worker_id = stack.get_instance(iid)["worker_id"]
    agent.start()
    wait_for(lambda: "using the worker token" in agent.log(), what="re-registration")
    assert stack.wait_status(iid, "ready", timeout=30)["worker_id"] == worker_id
    registered = [e for e in stack.events(iid) if e["kind"] == "registered"]
    assert [e["reason"] for e in registered][-2:] in (
        ["bootstrap", "reregister"],
        ["reregister", "bootstrap"],  # newest-first ordering
    )

    # DELETE: tokens revoked / terminate -> the agent stops the engine and exits 0.
    engine = agent.engine_pid()
    assert engine is not None
    response = stack.client.delete(f"/api/instances/{iid}")
    assert response.status_code in (200, 202, 204), response.text
    assert agent.wait(timeout=20) == 0
    assert not _alive(engine)
    assert "exiting:" in agent.log()


def test_url_file_change_followed_through_tls_tunnel(
    stack_factory: Any, tmp_path: Path, agents: list[Any]
) -> None:
    stack = stack_factory(env={"INVENTIV_HEARTBEAT_INTERVAL_S": HEARTBEAT_S})
    instance = stack.create_instance(provider="manual", model="echo")
    iid = instance["id"]
    cert, key = _self_signed(tmp_path)
    ca = cert  # self-signed: the certificate is its own authority
    tunnel = TlsProxy(stack.api_port, cert, key)
    url_file = tmp_path / "control-plane-url"
    url_file.write_text(tunnel.url + "\n")
    drop = ("WORKER_CONTROL_PLANE_URL", "WORKER_MODEL_ID")  # the URL comes from the file
    env = {k: v for k, v in instance["agent_env"].items() if k not in drop}
    agent = AgentProcess(
        tmp_path,
        env,
        WORKER_CONTROL_PLANE_URL_FILE=str(url_file),
        WORKER_CA_BUNDLE=str(ca),
        WORKER_ENGINE="none",  # this test is about the control-plane link only
    )
    agents.append(agent)
    agent.start()
    try:
        stack.wait_status(iid, "ready", timeout=30)
        assert tunnel.connections >= 1  # it did go through the self-signed TLS proxy
        # The tunnel dies and comes back under another URL (here: the API directly).
        url_file.write_text(stack.api_url + "\n")
    finally:
        tunnel.close()
    wait_for(
        lambda: agent.metrics().get("inventiv_agent_control_plane_url_changes_total") == 1,
        what="URL file re-read",
    )
    seq = stack.get_instance(iid)["heartbeat_seq"] or 0  # written by a batcher: may lag
    wait_for(
        lambda: (stack.get_instance(iid)["heartbeat_seq"] or 0) > seq + 2,
        what="heartbeats resumed",
    )
    log = agent.log()
    assert f"control-plane URL changed (from control-plane-url): {tunnel.url}" in log

    # The operator changes the URL on the control plane: it is pushed, signed, to the agent.
    pushed_url = f"http://localhost:{stack.api_port}"
    response = stack.client.put("/api/control-plane-url", json={"url": pushed_url})
    assert response.status_code == 200, response.text
    # 200 from the agent, so the real control plane's signature verified; the next heartbeat
    # response may carry the URL first, either way it is adopted exactly once.
    assert response.json()["pushed_to"] == 1
    assert url_file.read_text().strip() == pushed_url  # survives an agent restart
    wait_for(
        lambda: agent.metrics().get("inventiv_agent_control_plane_url_changes_total") == 2,
        what="pushed URL adopted",
    )
    assert agent.proc is not None and agent.proc.poll() is None
    assert agent.terminate() == 0


def test_untrusted_tls_is_not_accepted(tmp_path: Path, agents: list[Any]) -> None:
    # Without WORKER_CA_BUNDLE the self-signed proxy must be refused before any token is sent.
    cert, key = _self_signed(tmp_path)
    tunnel = TlsProxy(free_port(), cert, key)  # nothing behind it: TLS must fail first
    env = {
        "INSTANCE_ID": "8ddf90cb-168e-475d-88d4-1b970c6f191e",
        "INVENTIV_BOOTSTRAP_TOKEN": "ivt_boot_x",
        "WORKER_CONTROL_PLANE_URL": tunnel.url,
        "WORKER_ENGINE": "none",
    }
    agent = AgentProcess(tmp_path, env)
    agents.append(agent)
    agent.start()
    try:
        wait_for(lambda: "unreachable since" in agent.log(), what="unreachable log line")
        assert "CERTIFICATE_VERIFY_FAILED" in agent.log()
        assert tunnel.connections == 0  # the handshake failed: no request reached upstream
    finally:
        tunnel.close()
    assert agent.terminate() == 0


def test_engine_dies_with_a_sigkilled_agent(tmp_path: Path, agents: list[Any]) -> None:
    # The engine starts before registration, so no control plane is needed here.
    env = {
        "INSTANCE_ID": "8ddf90cb-168e-475d-88d4-1b970c6f191e",
        "INVENTIV_BOOTSTRAP_TOKEN": "ivt_boot_x",
        "WORKER_CONTROL_PLANE_URL": f"http://127.0.0.1:{free_port()}",
        "WORKER_ENGINE": "echo",
        "WORKER_MODEL_ID": "m",
    }
    agent = AgentProcess(tmp_path, env)
    agents.append(agent)
    agent.start()
    engine = wait_for(agent.engine_pid, what="engine started")
    wait_for(lambda: agent.metrics().get("inventiv_agent_engine_ready") == 1, what="engine ready")
    assert agent.proc is not None
    agent.proc.kill()  # no chance to clean up: the guard process must do it
    agent.proc.wait()
    wait_for(lambda: not _alive(engine), timeout=10, what="engine gone")


def test_invalid_url_exits_naming_the_rule(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "INVENTIV_"))},
        "INSTANCE_ID": "8ddf90cb-168e-475d-88d4-1b970c6f191e",
        "INVENTIV_BOOTSTRAP_TOKEN": "ivt_boot_x",
        "WORKER_CONTROL_PLANE_URL": "https://abc.trycloudflare.com/",
        "WORKER_STATE_DIR": str(tmp_path / "s"),
        "WORKER_ENGINE": "none",
    }
    result = subprocess.run(
        [sys.executable, "-m", "inventiv.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "no_trailing_slash" in result.stderr
    assert "Use: https://abc.trycloudflare.com" in result.stderr
