"""`inventiv tunnel` against a real control plane: the URL reaches env file, control plane and
the worker path (client -> TLS stand-in -> API -> orchestrator), and survives a restart."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil

from tests.conftest import Stack
from tests.fake_cloudflared.helpers import CLI, Running, make_env, read_env_file, wait_for

KEY = "WORKER_CONTROL_PLANE_URL"


def control_plane_url(stack: Stack) -> str | None:
    response = stack.client.get("/api/control-plane-url")
    assert response.status_code == 200, response.text
    return response.json()["url"]


def test_tunnel_url_reaches_env_file_control_plane_and_worker_path(
    tmp_path: Path, stack: Stack
) -> None:
    fake = make_env(tmp_path, stack.settings_env)
    assert fake.env_file == stack.data_dir / "dev.env"
    fake.env_file.write_text("# stack settings\nINVENTIV_LOG_LEVEL=warning\n")
    running = Running([*CLI, "tunnel"], fake.env)
    try:
        first = wait_for(lambda: fake.events(), what="the stand-in")[0]
        assert first["origin"] == stack.api_url
        url = first["url"]
        wait_for(lambda: control_plane_url(stack) == url, what="the control plane to use it")
        assert read_env_file(fake.env_file) == (
            f"# stack settings\nINVENTIV_LOG_LEVEL=warning\n{KEY}={url}\n"
        )
        ping = httpx.get(url + "/internal/worker/ping", verify=fake.ssl_context(), timeout=10)
        assert ping.status_code == 200
        assert ping.json()["ok"] is True

        # cloudflared dies: a new URL is written, announced, and works end to end
        psutil.Process(first["pid"]).kill()
        second = wait_for(lambda: fake.events()[1:], timeout=30, what="the restart")[0]
        assert second["url"] != url
        wait_for(lambda: control_plane_url(stack) == second["url"], what="the new URL")
        assert f"{KEY}={second['url']}\n" in read_env_file(fake.env_file)
        ping = httpx.get(
            second["url"] + "/internal/worker/ping", verify=fake.ssl_context(), timeout=10
        )
        assert ping.json()["ok"] is True
    finally:
        assert running.stop() == 0
