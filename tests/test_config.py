"""WORKER_CONTROL_PLANE_URL rules (the seed's "Important" list) and PORT_OFFSET arithmetic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inventiv.config import ControlPlaneURLError, Settings, validate_control_plane_url


@pytest.mark.parametrize(
    "url",
    [
        "https://abc-def-ghi.trycloudflare.com",
        "https://cp.example.com:8443",
        "http://127.0.0.1:8003",
        "http://localhost:18003",
        "http://[::1]:8003",
    ],
)
def test_valid_urls(url: str) -> None:
    assert validate_control_plane_url(url) == url


@pytest.mark.parametrize(
    ("url", "rule", "suggestion"),
    [
        ("https://abc.trycloudflare.com/", "no_trailing_slash", "https://abc.trycloudflare.com"),
        (
            "https://abc.trycloudflare.com/internal/worker/register",
            "no_path",
            "https://abc.trycloudflare.com",
        ),
        ("http://abc.trycloudflare.com", "https_required", "https://abc.trycloudflare.com"),
        ("https://abc.trycloudflare.com?x=1", "no_query", "https://abc.trycloudflare.com"),
        ("https://abc.trycloudflare.com#top", "no_query", "https://abc.trycloudflare.com"),
        (
            "https://user:pw@abc.trycloudflare.com",
            "no_credentials",
            "https://abc.trycloudflare.com",
        ),
        ("abc.trycloudflare.com", "absolute_https", "https://abc.trycloudflare.com"),
    ],
)
def test_broken_rules_are_named_with_the_fix(url: str, rule: str, suggestion: str) -> None:
    with pytest.raises(ControlPlaneURLError) as info:
        validate_control_plane_url(url)
    assert info.value.rule == rule
    assert info.value.suggestion == suggestion
    assert suggestion in str(info.value)


def test_port_offset_moves_both_ports(tmp_path: Path) -> None:
    settings = Settings(PORT_OFFSET=10000, INVENTIV_DATA_DIR=tmp_path, _env_file=None)
    assert settings.api_port == 18003
    assert settings.orchestrator_port == 18001
    assert settings.api_local_url == "http://127.0.0.1:18003"
    pinned = Settings(PORT_OFFSET=10000, API_HOST_PORT=9999, _env_file=None)
    assert pinned.api_port == 9999 and pinned.orchestrator_port == 18001


def test_each_offset_has_its_own_data_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    a = Settings(PORT_OFFSET=0, _env_file=None)
    b = Settings(PORT_OFFSET=10000, _env_file=None)
    assert a.data_dir != b.data_dir
    assert a.effective_database_url != b.effective_database_url


def test_admin_token_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    settings = Settings(INVENTIV_DATA_DIR=tmp_path, _env_file=None)
    token, generated = settings.resolve_admin_token()
    assert generated and len(token) > 30
    assert (settings.admin_token_path.stat().st_mode & 0o777) == 0o600
    again, generated_again = Settings(
        INVENTIV_DATA_DIR=tmp_path, _env_file=None
    ).resolve_admin_token()
    assert again == token and not generated_again


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inventiv.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://abc.trycloudflare.com/", "must not end with a slash"),
        ("https://abc.trycloudflare.com/internal/worker", "must not have a path"),
    ],
)
def test_cli_refuses_a_bad_url_naming_the_rule(tmp_path: Path, url: str, words: str) -> None:
    env_file = tmp_path / "dev.env"
    env_file.write_text(f"# from the seed\nWORKER_CONTROL_PLANE_URL={url}\n")
    result = run_cli(
        ["status"], {"INVENTIV_ENV_FILE": str(env_file), "INVENTIV_DATA_DIR": str(tmp_path)}
    )
    assert result.returncode == 2
    output = " ".join((result.stdout + result.stderr).split())
    assert words in output
    assert "Use: https://abc.trycloudflare.com" in output
    assert "Traceback" not in output
