"""`inventiv up/status/down` as an operator runs them, and two stacks side by side."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import free_port_offset


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inventiv.cli", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_two_stacks_side_by_side(tmp_path: Path) -> None:
    """Like PORT_OFFSET=0 and PORT_OFFSET=10000 on a laptop: separate ports, databases, logs."""
    offsets = [free_port_offset(), free_port_offset()]
    envs = [
        {"PORT_OFFSET": str(o), "INVENTIV_ENV_FILE": str(tmp_path / "none.env")} for o in offsets
    ]
    try:
        for env in envs:
            result = cli(["up"], env, tmp_path)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "New admin token (shown once)" in result.stdout
        again = cli(["up"], envs[0], tmp_path)
        assert again.returncode == 0 and "Already running" in again.stdout
        assert "shown once" not in again.stdout

        ids = []
        for offset in offsets:
            data_dir = tmp_path / ".inventiv" / f"stack-{offset}"
            assert (data_dir / "inventiv.db").exists()
            assert (data_dir / "admin-token").stat().st_mode & 0o777 == 0o600
            token = (data_dir / "admin-token").read_text().strip()
            api = f"http://127.0.0.1:{8003 + offset}"
            assert httpx.get(api + "/", trust_env=False).json()["orchestrator"] == "ok"
            created = httpx.post(
                api + "/api/instances",
                json={"provider": "manual", "model": "echo"},
                headers={"authorization": f"Bearer {token}"},
                trust_env=False,
            ).json()
            ids.append((api, token, created["id"]))
        # Each stack sees only its own instance.
        for api, token, own in ids:
            listed = httpx.get(
                api + "/api/instances",
                headers={"authorization": f"Bearer {token}"},
                trust_env=False,
            ).json()
            assert [i["id"] for i in listed["items"]] == [own]
        status = cli(["status"], envs[1], tmp_path)
        assert status.returncode == 0 and "ok" in status.stdout
    finally:
        for env in envs:
            cli(["down"], env, tmp_path)
    assert cli(["status"], envs[0], tmp_path).returncode == 1
    # Stopping one stack did not need the other; both are down now.
    down_again = cli(["down"], envs[0], tmp_path)
    assert "No stack running" in down_again.stdout


def test_up_refuses_a_port_taken_by_another_program(tmp_path: Path) -> None:
    import socket

    offset = free_port_offset()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 8003 + offset))
        blocker.listen()
        result = cli(
            ["up"], {"PORT_OFFSET": str(offset), "INVENTIV_ENV_FILE": str(tmp_path / "x")}, tmp_path
        )
    assert result.returncode == 1
    assert f"Port {8003 + offset}" in result.stderr and "PORT_OFFSET" in result.stderr


def test_supervisor_restarts_a_crashed_service(tmp_path: Path) -> None:
    import time

    import psutil

    offset = free_port_offset()
    env = {"PORT_OFFSET": str(offset), "INVENTIV_ENV_FILE": str(tmp_path / "none.env")}
    try:
        assert cli(["up"], env, tmp_path).returncode == 0
        victims = [
            p
            for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"]
            and p.info["cmdline"][-2:] == ["serve", "orchestrator"]
            and p.environ().get("PORT_OFFSET") == str(offset)
        ]
        assert len(victims) == 1
        victims[0].kill()
        api = f"http://127.0.0.1:{8003 + offset}/"
        deadline = time.monotonic() + 30
        seen_down = False
        while time.monotonic() < deadline:
            state = httpx.get(api, trust_env=False).json()["orchestrator"]
            seen_down = seen_down or state == "unreachable"
            if seen_down and state == "ok":
                break
            time.sleep(0.1)
        assert seen_down and state == "ok"
        log = (tmp_path / ".inventiv" / f"stack-{offset}" / "logs" / "supervisor.log").read_text()
        assert "orchestrator exited with -9; restarting" in log
    finally:
        cli(["down"], env, tmp_path)


def test_down_stops_a_stack_whose_data_directory_was_deleted(tmp_path: Path) -> None:
    """`rm -rf .inventiv` under a running stack: `up` says what to do, `down` still stops it."""
    import shutil

    offset = free_port_offset()
    env = {"PORT_OFFSET": str(offset), "INVENTIV_ENV_FILE": str(tmp_path / "none.env")}
    api = f"http://127.0.0.1:{8003 + offset}/"
    try:
        assert cli(["up"], env, tmp_path).returncode == 0
        shutil.rmtree(tmp_path / ".inventiv")
        again = cli(["up"], env, tmp_path)
        assert again.returncode == 1 and "inventiv down" in again.stderr
        down = cli(["down"], env, tmp_path)
        assert down.returncode == 0 and "Stopped the stack" in down.stdout
        try:
            httpx.get(api, trust_env=False, timeout=2)
            raise AssertionError("the API still answers after `inventiv down`")
        except httpx.ConnectError:
            pass
        assert cli(["status"], env, tmp_path).returncode == 1
    finally:
        cli(["down"], env, tmp_path)
