"""A live worker behind the tunnel: it boots with the tunnel's https URL, goes worker -> TLS ->
API -> orchestrator, and follows the tunnel when cloudflared restarts with a new URL (the control
plane pushes it to the worker's signed control endpoint)."""

from __future__ import annotations

from pathlib import Path

import psutil

from tests.conftest import StackFactory
from tests.fake_cloudflared.helpers import CLI, Running, make_env, read_env_file, wait_for


def agent_environ(instance_id: str) -> dict[str, str] | None:
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("INSTANCE_ID") == instance_id and env.get("INVENTIV_LOCAL_ROLE") == "agent":
            return env
    return None


def test_restarted_tunnel_reaches_live_workers(tmp_path: Path, stack_factory: StackFactory) -> None:
    cert = tmp_path / "fake-cloudflared.pem"
    stack = stack_factory(env={"WORKER_CA_BUNDLE": str(cert), "INVENTIV_HEARTBEAT_INTERVAL_S": "1"})
    fake = make_env(tmp_path, stack.settings_env)
    running = Running([*CLI, "tunnel"], fake.env)
    try:
        first = wait_for(lambda: fake.events(), what="the stand-in")[0]["url"]
        wait_for(
            lambda: stack.client.get("/api/control-plane-url").json()["url"] == first,
            what="the control plane to adopt the tunnel URL",
        )
        created = stack.create_instance(provider="local", model="echo")
        stack.wait_status(created["id"], "ready", timeout=30)
        env = agent_environ(created["id"])
        assert env is not None and env["WORKER_CONTROL_PLANE_URL"] == first

        # cloudflared dies; `inventiv tunnel` restarts it with a new URL and announces it
        old = next(e for e in fake.events() if e["url"] == first)
        psutil.Process(old["pid"]).kill()
        second = wait_for(lambda: fake.events()[1:], timeout=30, what="the restart")[0]["url"]
        assert second != first
        wait_for(
            lambda: f"WORKER_CONTROL_PLANE_URL={second}" in read_env_file(fake.env_file),
            what="the new URL in env/dev.env",
        )

        def pushed() -> bool:
            return any(
                e["kind"] == "url_pushed" and second in (e["message"] or "")
                for e in stack.events(created["id"])
            )

        wait_for(pushed, timeout=20, what="the push to the live worker")
        # The old URL is dead; the worker keeps heartbeating through the new one.
        before = stack.get_instance(created["id"])["heartbeat_seq"]
        wait_for(
            lambda: (stack.get_instance(created["id"])["heartbeat_seq"] or 0) > before + 2,
            timeout=20,
            what="heartbeats through the new URL",
        )
        assert stack.get_instance(created["id"])["status"] == "ready"
    finally:
        running.stop()
        stack.client.delete(f"/api/instances/{created['id']}")
