"""`inventiv doctor`: one test per failure of the troubleshooting guide, each checking that the
output names the fix, and the all-green run through the stand-in against a real stack."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from inventiv.config import Settings
from inventiv.tunnel.doctor import Doctor
from inventiv.tunnel.probe import Probe
from inventiv.tunnel.stacksettings import ConfiguredURL
from tests.conftest import Stack, free_port, free_port_offset
from tests.fake_cloudflared.helpers import (  # fake_api_fixture provides `api`
    CLI,
    FakeAPI,
    FakeEnv,
    Running,
    fake_api_fixture,  # noqa: F401
    make_env,
    start_fake_cloudflared,
    stop_process,
    wait_for,
)

KEY = "WORKER_CONTROL_PLANE_URL"


def doctor(fake: FakeEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "doctor", "--timeout", "3", *args],
        env=fake.env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def doctor_json(fake: FakeEnv) -> dict[str, dict[str, Any]]:
    """The checks by id; the exit status must agree with the report's "ok"."""
    result = doctor(fake, "--json")
    report = json.loads(result.stdout)
    assert report["ok"] is (result.returncode == 0)
    assert result.returncode in (0, 1)
    return {check["id"]: check for check in report["checks"]}


def test_connection_refused_api_not_started(tmp_path: Path) -> None:
    offset = free_port_offset()
    fake = make_env(tmp_path, {"PORT_OFFSET": str(offset)})
    fake.env_file.write_text(f"{KEY}=https://a-b-c.trycloudflare.com\n")
    result = doctor(fake)
    assert result.returncode == 1
    assert f"Connection refused on http://127.0.0.1:{8003 + offset}" in result.stdout
    assert f"fix: Start it: `PORT_OFFSET={offset} make api-expose`" in result.stdout
    checks = doctor_json(fake)
    assert checks["api_local"]["status"] == "fail"
    # what depends on the API is skipped, with the reason
    assert checks["orchestrator"]["status"] == "skip"
    assert checks["public_root"]["status"] == "skip"
    assert "API answers" in checks["public_root"]["detail"]


def test_cloudflared_on_the_wrong_port(tmp_path: Path, api: FakeAPI) -> None:
    api_port = api.server.server_address[1]
    fake = make_env(tmp_path, api.env())
    wrong_port = free_port()
    proc, url = start_fake_cloudflared(fake, wrong_port)
    try:
        fake.env_file.write_text(f"{KEY}={url}\n")
        result = doctor(fake)
        checks = doctor_json(fake)
    finally:
        stop_process(proc)
    assert result.returncode == 1
    assert f"pid {proc.pid} -> 127.0.0.1:{wrong_port}" in result.stdout
    assert f"`cloudflared tunnel --url http://127.0.0.1:{api_port}`" in result.stdout
    assert checks["cloudflared_port"]["status"] == "fail"
    assert "make tunnel" in checks["cloudflared_port"]["fix"]
    # the public URL answers with the edge's 502: the tunnel cannot reach the API
    assert checks["public_root"]["status"] == "fail"
    assert "HTTP 502" in checks["public_root"]["detail"]


def test_tunnel_down(tmp_path: Path, api: FakeAPI) -> None:
    fake = make_env(tmp_path, api.env())
    proc, url = start_fake_cloudflared(fake, api.server.server_address[1])
    stop_process(proc)
    fake.env_file.write_text(f"{KEY}={url}\n")
    result = doctor(fake)
    assert result.returncode == 1
    assert f"Nothing answers at {url}" in result.stdout
    assert "the tunnel is down" in result.stdout
    checks = doctor_json(fake)
    # no cloudflared at all, or (another stack's) on another port: both say how to restart it
    tunnel_check = checks["cloudflared_running"]
    if tunnel_check["status"] == "pass":
        tunnel_check = checks["cloudflared_port"]
    assert tunnel_check["status"] == "fail"
    assert "make tunnel" in tunnel_check["fix"]
    assert checks["public_root"]["status"] == "fail"
    assert "make tunnel" in checks["public_root"]["fix"]
    assert checks["api_local"]["status"] == "pass"


@pytest.mark.parametrize(
    "bad",
    [
        "https://a-b-c.trycloudflare.com/",
        "https://a-b-c.trycloudflare.com/internal/worker/register",
    ],
    ids=["trailing-slash", "with-path"],
)
def test_url_with_trailing_slash_or_path(tmp_path: Path, api: FakeAPI, bad: str) -> None:
    fake = make_env(tmp_path, api.env())
    fake.env_file.write_text(f"# tunnel\n{KEY}={bad}\n")
    result = doctor(fake)
    assert result.returncode == 1
    assert f"fix: In {fake.env_file}, write: {KEY}=https://a-b-c.trycloudflare.com\n" in (
        result.stdout
    )
    checks = doctor_json(fake)
    assert checks["url_valid"]["status"] == "fail"
    assert checks["public_root"]["status"] == "skip"
    assert checks["api_local"]["status"] == "pass", "a bad URL must not stop the other checks"


def test_url_not_set_says_make_tunnel(tmp_path: Path, api: FakeAPI) -> None:
    fake = make_env(tmp_path, api.env())
    checks = doctor_json(fake)
    assert checks["url_valid"]["status"] == "fail"
    assert "make tunnel" in checks["url_valid"]["fix"]


def test_orchestrator_unreachable_from_the_api(tmp_path: Path, api: FakeAPI) -> None:
    api.state.orchestrator = "unreachable"
    fake = make_env(tmp_path, api.env())
    fake.env_file.write_text(f"{KEY}=https://a-b-c.trycloudflare.com\n")
    result = doctor(fake)
    assert result.returncode == 1
    assert "The API reports the orchestrator as 'unreachable'" in result.stdout
    assert "fix: Start the whole stack with the same PORT_OFFSET: `make up`" in result.stdout


def test_control_plane_still_handing_out_an_old_url(tmp_path: Path, api: FakeAPI) -> None:
    fake = make_env(tmp_path, api.env())
    proc, url = start_fake_cloudflared(fake, api.server.server_address[1])
    api.state.control_url = "https://old-gone.trycloudflare.com"
    try:
        fake.env_file.write_text(f"{KEY}={url}\n")
        checks = doctor_json(fake)
    finally:
        stop_process(proc)
    assert checks["control_plane_url"]["status"] == "fail"
    assert f"inventiv tunnel --set-url {url}" in checks["control_plane_url"]["fix"]
    assert checks["worker_path"]["status"] == "pass"


def test_dead_quick_tunnel_hostname_says_the_url_changed() -> None:
    settings = Settings(_env_file=None, PORT_OFFSET=0, API_HOST_PORT=None)  # type: ignore[call-arg]
    url = "https://gone-four-words.trycloudflare.com"
    check = Doctor(settings, ConfiguredURL(url, "env/dev.env", Path("env/dev.env")))
    check.url = url
    detail, fix = check._public_failure(Probe(url + "/", "dns", error="Name or service not known"))
    assert "does not resolve" in detail
    assert "make tunnel" in fix
    assert "named tunnel" in fix


def test_all_green_through_the_stand_in(tmp_path: Path, stack: Stack) -> None:
    fake = make_env(tmp_path, stack.settings_env)
    running = Running([*CLI, "tunnel"], fake.env)
    try:
        wait_for(lambda: "now uses" in running.output, timeout=30, what="the announcement")
        result = doctor(fake)
        checks = doctor_json(fake)
    finally:
        running.stop()
    assert result.returncode == 0, result.stdout
    assert "All checks passed" in result.stdout
    assert {c["status"] for c in checks.values()} == {"pass"}
    assert checks["worker_path"]["detail"].endswith("/internal/worker/ping -> 200 ok")


@pytest.mark.parametrize(
    "doc", ["docs/worker-control-plane-url.md", "docs/fr/worker-control-plane-url.md"]
)
def test_docs_list_every_doctor_check(doc: str) -> None:
    """The guide's table of checks is the doctor's list, in the doctor's order."""
    settings = Settings(_env_file=None, PORT_OFFSET=0, API_HOST_PORT=free_port())  # type: ignore[call-arg]
    report = Doctor(
        settings,
        ConfiguredURL(None, "env/dev.env", Path("env/dev.env")),
        timeout=1,
        processes=list,
    ).run()
    text = (Path(__file__).resolve().parents[1] / doc).read_text(encoding="utf-8")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| cloudflared is running"))
    rows = [line.split("|")[1].strip() for line in lines[start:] if line.startswith("|")]
    rows = rows[: len(report.checks)]
    titles = [check.title for check in report.checks]
    assert len(rows) == len(titles) == 9
    for row, title in zip(rows, titles, strict=True):
        assert title.startswith(row.replace("`", "")), (row, title)
