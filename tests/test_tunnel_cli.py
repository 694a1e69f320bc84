"""`inventiv tunnel` against the cloudflared stand-in and a minimal control plane.

The minimal control plane (FakeAPI) answers only the HTTP calls the command makes; the same
flows against a real stack are in test_tunnel_stack.py.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port
from tests.fake_cloudflared.helpers import (  # fake_api_fixture provides `api`
    CLI,
    FakeAPI,
    FakeEnv,
    Running,
    fake_api_fixture,  # noqa: F401
    make_env,
    read_env_file,
    wait_for,
)

KEY = "WORKER_CONTROL_PLANE_URL"
ENV_BEFORE = "# dev settings, edited by hand\nFOO=bar\n\n# tunnel:\nWORKER_CONTROL_PLANE_URL=https://old-gone.trycloudflare.com\n"


@pytest.fixture
def fake(tmp_path: Path, api: FakeAPI) -> FakeEnv:
    fake = make_env(tmp_path, api.env())
    fake.env_file.write_text(ENV_BEFORE)
    return fake


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_tunnel_writes_the_url_and_announces_it(fake: FakeEnv, api: FakeAPI) -> None:
    running = Running([*CLI, "tunnel"], fake.env)
    try:
        wait_for(lambda: api.state.puts, what="the announcement")
        url = api.state.puts[0]["url"]
        started = fake.events()
        assert [e["url"] for e in started] == [url]
        assert started[0]["origin"] == f"http://127.0.0.1:{api.server.server_address[1]}"
        # env file: the key replaced, every other line and comment kept
        assert read_env_file(fake.env_file) == ENV_BEFORE.replace(
            "https://old-gone.trycloudflare.com", url
        )
        # the announced URL really reaches the API, over TLS
        response = httpx.get(url + "/", verify=fake.ssl_context(), trust_env=False)
        assert response.json()["service"] == "inventiv-api"
        wait_for(lambda: "now uses" in running.output, what="the confirmation")
        assert f"Tunnel URL: {url}" in running.output
    finally:
        code = running.stop()
    assert code == 0
    assert gone(started[0]["pid"]), "stopping the tunnel must stop cloudflared"


def test_progress_is_printed_while_cloudflared_is_slow(tmp_path: Path, api: FakeAPI) -> None:
    fake = make_env(
        tmp_path, api.env(), FAKE_CLOUDFLARED_DELAY_S="2.6", FAKE_CLOUDFLARED_HOST="localhost"
    )
    running = Running([*CLI, "tunnel"], fake.env)
    try:
        wait_for(lambda: api.state.puts, what="the announcement")
        assert api.state.puts[0]["url"].startswith("https://localhost:")
        assert "Waiting for cloudflared to publish the tunnel URL" in running.output
    finally:
        running.stop()


def test_cloudflared_killed_is_restarted_and_the_new_url_published(
    fake: FakeEnv, api: FakeAPI
) -> None:
    running = Running([*CLI, "tunnel"], fake.env)
    try:
        wait_for(lambda: api.state.puts, what="the first announcement")
        first = fake.events()[0]
        psutil.Process(first["pid"]).kill()
        wait_for(lambda: len(api.state.puts) >= 2, timeout=30, what="the new URL")
        second = fake.events()[-1]
        assert second["pid"] != first["pid"]
        assert second["url"] != first["url"]
        assert api.state.puts[-1]["url"] == second["url"]
        assert f"{KEY}={second['url']}\n" in read_env_file(fake.env_file)
        assert first["url"] not in read_env_file(fake.env_file)
        assert "Restarting in" in running.output
        ping = httpx.get(
            second["url"] + "/internal/worker/ping", verify=fake.ssl_context(), trust_env=False
        )
        assert ping.json()["ok"] is True
    finally:
        running.stop()


def test_announcement_is_retried_until_the_api_answers(tmp_path: Path) -> None:
    port = free_port()
    token = "tok-" + uuid.uuid4().hex
    fake = make_env(tmp_path, {"API_HOST_PORT": str(port), "INVENTIV_ADMIN_TOKEN": token})
    running = Running([*CLI, "tunnel"], fake.env)
    try:
        wait_for(lambda: "Could not announce" in running.output, what="the warning")
        assert "make api-expose" in running.output
        url = fake.events()[0]["url"]
        assert f"{KEY}={url}" in read_env_file(fake.env_file)
        with FakeAPI(port, token) as api:
            wait_for(lambda: api.state.puts, timeout=15, what="the retried announcement")
            assert api.state.puts[0]["url"] == url
    finally:
        running.stop()


def test_missing_cloudflared_says_how_to_install_it(tmp_path: Path, api: FakeAPI) -> None:
    fake = make_env(tmp_path, api.env(), with_fake=False)
    fake.env_file.write_text(ENV_BEFORE)
    result = subprocess.run(
        [*CLI, "tunnel"], env=fake.env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "cloudflared is not installed" in out
    assert "brew install cloudflared" in out
    assert "sudo apt-get install cloudflared" in out
    assert "github.com/cloudflare/cloudflared/releases" in out
    assert read_env_file(fake.env_file) == ENV_BEFORE
    assert api.state.puts == []


def test_no_url_from_cloudflared_times_out(tmp_path: Path, api: FakeAPI) -> None:
    fake = make_env(tmp_path, api.env(), FAKE_CLOUDFLARED_SILENT="1")
    result = subprocess.run(
        [*CLI, "tunnel", "--url-timeout", "2"],
        env=fake.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cloudflared printed no tunnel URL within 2 s" in result.stdout
    assert "Last lines from cloudflared" in result.stdout
    assert api.state.puts == []
    assert gone(fake.events()[0]["pid"]), "a cloudflared that gave no URL must be stopped"


def test_set_url_writes_and_announces_without_cloudflared(fake: FakeEnv, api: FakeAPI) -> None:
    url = "https://cp.example.com"
    result = subprocess.run(
        [*CLI, "tunnel", "--set-url", url], env=fake.env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout
    assert api.state.puts == [{"url": url}]
    assert f"{KEY}={url}\n" in read_env_file(fake.env_file)
    assert fake.events() == []


def test_set_url_refuses_a_bad_url_with_the_corrected_value(fake: FakeEnv, api: FakeAPI) -> None:
    result = subprocess.run(
        [*CLI, "tunnel", "--set-url", "https://cp.example.com/"],
        env=fake.env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Use: https://cp.example.com" in result.stdout
    assert api.state.puts == []
    assert read_env_file(fake.env_file) == ENV_BEFORE


def test_a_second_tunnel_for_the_same_stack_is_refused(fake: FakeEnv, api: FakeAPI) -> None:
    running = Running([*CLI, "tunnel"], fake.env)
    try:
        wait_for(lambda: api.state.puts, what="the first tunnel")
        second = subprocess.run(
            [*CLI, "tunnel"], env=fake.env, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1
        assert f"already runs for this stack (pid {running.proc.pid}" in second.stdout
        assert len(fake.events()) == 1, "the second command must not start cloudflared"
    finally:
        running.stop()


def test_stop_while_waiting_for_the_url_stops_cloudflared(tmp_path: Path, api: FakeAPI) -> None:
    fake = make_env(tmp_path, api.env(), FAKE_CLOUDFLARED_SILENT="1")
    running = Running([*CLI, "tunnel"], fake.env)
    started = wait_for(lambda: fake.events(), what="the stand-in")[0]
    assert running.stop() == 0
    assert "Stopping cloudflared." in running.output
    assert gone(started["pid"])
    assert api.state.puts == []
