"""`inventiv instances ...`: the admin API from the terminal, as an operator uses it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import Stack


def run(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inventiv.cli", "instances", *args],
        env={**os.environ, **stack.settings_env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_create_list_events_terminate(stack: Stack) -> None:
    created = run(stack, "create", "--provider", "manual", "--model", "echo")
    assert created.returncode == 0, created.stderr
    instance_id = re.search(r"Instance (\S+) \(manual, echo\)", created.stdout).group(1)  # type: ignore[union-attr]
    assert f"export INSTANCE_ID={instance_id}" in created.stdout
    assert "export INVENTIV_BOOTSTRAP_TOKEN=ivt_boot_" in created.stdout

    listed = run(stack, "list")
    assert instance_id in listed.stdout and "booting" in listed.stdout

    events = run(stack, "events", instance_id)
    assert "created" in events.stdout and "provisioning -> booting" in events.stdout

    assert run(stack, "terminate", instance_id).returncode == 0
    stack.wait_status(instance_id, "terminated")
    assert instance_id not in run(stack, "list").stdout
    assert instance_id in run(stack, "list", "--all").stdout


def test_errors_are_one_clear_line(stack: Stack) -> None:
    missing = run(stack, "show", "0b8f6f5e-6a1c-4ad4-9a55-3d0c0f0f7f0e")
    assert missing.returncode == 1
    assert "instance_not_found" in missing.stderr and "Traceback" not in missing.stderr
    stack.stop_api()
    down = run(stack, "list")
    assert down.returncode == 1
    assert "The API does not answer" in down.stderr and "make up" in down.stderr
