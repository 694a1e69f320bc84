"""The env-file writer: one key changes, every other byte stays, the write is atomic."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from inventiv.tunnel import envfile
from inventiv.tunnel.envfile import read_env_var, render_update, set_env_var

KEY = "WORKER_CONTROL_PLANE_URL"
NEW = "https://new-url.trycloudflare.com"

ORIGINAL = """\
# Inventiv dev settings
PORT_OFFSET=10000

# The tunnel URL (see docs/worker-control-plane-url.md)
# WORKER_CONTROL_PLANE_URL=https://commented.trycloudflare.com
WORKER_CONTROL_PLANE_URL=https://old-url.trycloudflare.com
SCW_SECRET_KEY="quoted value # not a comment"
WORKER_CONTROL_PLANE_URL_FILE=/var/lib/inventiv/url
"""


def test_replaces_only_the_key_and_keeps_everything_else() -> None:
    updated = render_update(ORIGINAL, KEY, NEW)
    expected = ORIGINAL.replace(
        "WORKER_CONTROL_PLANE_URL=https://old-url.trycloudflare.com",
        f"WORKER_CONTROL_PLANE_URL={NEW}",
    )
    assert updated == expected
    # the commented-out line and the *_FILE key (same prefix) are untouched
    assert "# WORKER_CONTROL_PLANE_URL=https://commented.trycloudflare.com\n" in updated
    assert "WORKER_CONTROL_PLANE_URL_FILE=/var/lib/inventiv/url\n" in updated


def test_appends_the_key_when_absent() -> None:
    text = "# only a comment\nPORT_OFFSET=0\n"
    assert render_update(text, KEY, NEW) == text + f"{KEY}={NEW}\n"


def test_appends_after_a_last_line_without_newline() -> None:
    assert render_update("PORT_OFFSET=0", KEY, NEW) == f"PORT_OFFSET=0\n{KEY}={NEW}\n"


def test_keeps_export_prefix_and_crlf() -> None:
    text = f"A=1\r\nexport {KEY}=https://old.example.com\r\nB=2\r\n"
    assert render_update(text, KEY, NEW) == f"A=1\r\nexport {KEY}={NEW}\r\nB=2\r\n"


def test_refuses_multiline_values() -> None:
    with pytest.raises(ValueError):
        render_update("", KEY, "https://a.example.com\nINJECTED=1")


def test_set_env_var_writes_file_and_reports_change(tmp_path: Path) -> None:
    path = tmp_path / "env" / "dev.env"
    assert set_env_var(path, KEY, NEW) is True
    assert path.read_text() == f"{KEY}={NEW}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # may hold secrets
    assert set_env_var(path, KEY, NEW) is False
    assert read_env_var(path, KEY) == NEW


def test_set_env_var_keeps_file_mode_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "dev.env"
    path.write_text(ORIGINAL)
    path.chmod(0o640)
    set_env_var(path, KEY, NEW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.env"]
    assert read_env_var(path, KEY) == NEW
    assert read_env_var(path, "SCW_SECRET_KEY") == "quoted value # not a comment"


def test_failed_write_leaves_the_original_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Atomicity: the new content goes to a temporary file renamed over the original, so a
    failure before the rename changes nothing and leaves no debris."""
    path = tmp_path / "dev.env"
    path.write_text(ORIGINAL)

    def broken_replace(src: str, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(envfile.os, "replace", broken_replace)
    with pytest.raises(OSError):
        set_env_var(path, KEY, NEW)
    assert path.read_text() == ORIGINAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.env"]


def test_replacement_is_a_rename_not_an_in_place_rewrite(tmp_path: Path) -> None:
    """A reader holding the old file keeps reading the old, complete content."""
    path = tmp_path / "dev.env"
    path.write_text(ORIGINAL)
    before = os.stat(path).st_ino
    with path.open() as reader:
        set_env_var(path, KEY, NEW)
        assert reader.read() == ORIGINAL
    assert os.stat(path).st_ino != before
