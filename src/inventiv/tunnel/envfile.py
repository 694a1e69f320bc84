"""Update one KEY=value line of an env file (env/dev.env) without disturbing anything else.

The operator edits this file by hand: comments, ordering, blank lines, `export` prefixes and
every other variable must survive an automatic URL change byte for byte. The write is atomic
(temporary file in the same directory, fsync, rename) so a crash or a concurrent reader never
sees half a file.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path

from dotenv import dotenv_values

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NEW_FILE_MODE = 0o600  # env files hold secrets (admin token, cloud keys)


def _assignment_re(key: str) -> re.Pattern[str]:
    return re.compile(rf"^(?P<prefix>\s*(?:export\s+)?){re.escape(key)}\s*=")


def _line_ending(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def render_update(text: str, key: str, value: str) -> str:
    """Return `text` with every active `KEY=...` line set to `KEY=value` (or one appended).

    Commented-out assignments (`# KEY=...`) are left alone: they are the operator's notes.
    """
    if not _KEY_RE.match(key):
        raise ValueError(f"invalid environment variable name: {key!r}")
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError(f"{key} value must be a single line")
    pattern = _assignment_re(key)
    newline = _line_ending(text)
    lines = text.splitlines(keepends=True)
    found = False
    for index, line in enumerate(lines):
        match = pattern.match(line)
        if match is None:
            continue
        body = line.rstrip("\r\n")
        ending = line[len(body) :]
        lines[index] = f"{match.group('prefix')}{key}={value}{ending}"
        found = True
    if not found:
        if lines and not lines[-1].endswith(("\n", "\r")):
            lines[-1] += newline
        lines.append(f"{key}={value}{newline}")
    return "".join(lines)


def set_env_var(path: Path, key: str, value: str) -> bool:
    """Set KEY=value in the env file at `path`, creating it (mode 0600) if needed.

    Returns whether the file changed, so callers can say "unchanged" instead of rewriting.
    """
    try:
        original = path.read_text(encoding="utf-8")
        mode: int | None = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        original, mode = "", None
    updated = render_update(original, key, value)
    if updated == original and mode is not None:
        return False
    _atomic_write(path, updated, _NEW_FILE_MODE if mode is None else mode)
    return True


def _atomic_write(path: Path, content: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def read_env_var(path: Path, key: str) -> str | None:
    """The value KEY has in the env file (dotenv rules: last assignment wins), or None."""
    if not path.is_file():
        return None
    value = dotenv_values(path, encoding="utf-8").get(key)
    return value if value is not None else None
