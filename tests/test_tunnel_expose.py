"""`inventiv expose` (`make api-expose`): the API answers on 127.0.0.1:(8003+PORT_OFFSET), and
the printed cloudflared command targets exactly that port."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from inventiv.config import Settings
from inventiv.stack import port_free
from inventiv.tunnel.cloudflared import quick_tunnel_command_text
from tests.conftest import Stack, free_port, free_port_offset
from tests.fake_cloudflared.helpers import (
    CLI,
    FakeAPI,
    make_env,
)


def expose(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "expose"], env=env, capture_output=True, text=True, timeout=120)


def test_port_offset_10000_gives_18003() -> None:
    settings = Settings(_env_file=None, PORT_OFFSET=10000, API_HOST_PORT=None)  # type: ignore[call-arg]
    assert settings.api_port == 18003
    assert quick_tunnel_command_text(settings.api_port) == (
        "cloudflared tunnel --url http://127.0.0.1:18003"
    )


def test_seed_example_port_offset_10000(tmp_path: Path) -> None:
    """`PORT_OFFSET=10000 inventiv expose` with an API on 18003 prints the seed's command."""
    if not port_free(18003):
        pytest.skip("port 18003 is in use on this machine")
    token = "tok-" + uuid.uuid4().hex
    with FakeAPI(18003, token):
        fake = make_env(tmp_path, {"PORT_OFFSET": "10000", "INVENTIV_ADMIN_TOKEN": token})
        result = expose(fake.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "API already running on http://127.0.0.1:18003" in result.stdout
    assert "    cloudflared tunnel --url http://127.0.0.1:18003\n" in result.stdout
    assert "PORT_OFFSET=10000 make tunnel" in result.stdout


def test_expose_is_idempotent_on_a_running_stack(tmp_path: Path, stack: Stack) -> None:
    fake = make_env(tmp_path, stack.settings_env)
    for _ in range(2):
        result = expose(fake.env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"API already running on {stack.api_url}" in result.stdout
        assert f"    cloudflared tunnel --url http://127.0.0.1:{stack.api_port}\n" in result.stdout
    # the stack's own processes are still the ones answering
    assert all(proc.poll() is None for proc in stack.procs.values())


def test_expose_starts_the_stack_when_nothing_answers(tmp_path: Path) -> None:
    offset = free_port_offset()
    fake = make_env(
        tmp_path,
        {"PORT_OFFSET": str(offset), "INVENTIV_ADMIN_TOKEN": "tok-" + uuid.uuid4().hex},
        INVENTIV_LOG_LEVEL="warning",
    )
    try:
        result = expose(fake.env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"API started on http://127.0.0.1:{8003 + offset}" in result.stdout
        status = httpx.get(f"http://127.0.0.1:{8003 + offset}/", trust_env=False).json()
        assert status["service"] == "inventiv-api"
        assert status["orchestrator"] == "ok"
        again = expose(fake.env)
        assert "API already running" in again.stdout
    finally:
        subprocess.run([*CLI, "down"], env=fake.env, capture_output=True, timeout=60)


def test_another_program_on_the_port_is_reported(tmp_path: Path) -> None:
    port = free_port()
    with FakeAPI(port, "tok") as other:
        other.state.orchestrator = "ok"
        # answers, but not as the Inventiv API
        other.server.RequestHandlerClass.do_GET = _not_inventiv  # type: ignore[method-assign]
        fake = make_env(tmp_path, {"API_HOST_PORT": str(port)})
        result = expose(fake.env)
    assert result.returncode == 1
    assert f"Port {port} answers (HTTP 200) but not as the Inventiv API" in result.stdout


def _not_inventiv(handler: object) -> None:
    handler._json(200, {"service": "something-else"})  # type: ignore[attr-defined]
