"""Publish a tunnel URL: env file, state file, control plane, operator — in that order.

The env file is written first so the URL survives a control-plane restart; the control plane is
told second so live workers get it without any restart; a failed announcement is retried while
the tunnel runs, because the API may simply be starting.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from inventiv.config import (
    ControlPlaneURLError,
    Settings,
    validate_control_plane_url,
    write_private_file,
)
from inventiv.tunnel import output
from inventiv.tunnel.announce import AnnounceResult, announce_url
from inventiv.tunnel.envfile import set_env_var
from inventiv.tunnel.stacksettings import URL_KEY

STATE_FILE = "tunnel.json"
RETRY_ANNOUNCE_INITIAL_S = 1.0
RETRY_ANNOUNCE_MAX_S = 10.0


def state_path(settings: Settings) -> Path:
    """Where `inventiv tunnel` records what it runs, for `inventiv doctor`."""
    return settings.data_dir / STATE_FILE


@dataclass(frozen=True)
class TunnelState:
    url: str
    api_port: int
    mode: str
    cloudflared_pid: int | None
    supervisor_pid: int
    updated_at: float


def write_state(settings: Settings, state: TunnelState) -> None:
    write_private_file(state_path(settings), json.dumps(state.__dict__, indent=2) + "\n")


def read_state(settings: Settings) -> TunnelState | None:
    try:
        data = json.loads(state_path(settings).read_text(encoding="utf-8"))
        return TunnelState(**data)
    except (FileNotFoundError, ValueError, TypeError):
        return None


class URLPublisher:
    def __init__(
        self, settings: Settings, env_file: Path, console: Console, *, mode: str = "quick"
    ) -> None:
        self.settings = settings
        self.env_file = env_file
        self.console = console
        self.mode = mode
        self.pending_url: str | None = None
        self._next_retry = 0.0
        self._retry_delay = RETRY_ANNOUNCE_INITIAL_S
        self.published: list[str] = []

    def publish(self, url: str, cloudflared_pid: int | None) -> None:
        url = validate_control_plane_url(url)
        changed = set_env_var(self.env_file, URL_KEY, url)
        write_state(
            self.settings,
            TunnelState(
                url, self.settings.api_port, self.mode, cloudflared_pid, os.getpid(), time.time()
            ),
        )
        self.published.append(url)
        self.console.print(f"[bold green]Tunnel URL:[/bold green] {escape(url)}")
        where = "written to" if changed else "already in"
        output.ok(self.console, f"{URL_KEY}={url} {where} {self.env_file}")
        self.pending_url = url
        self._retry_delay = RETRY_ANNOUNCE_INITIAL_S
        self._announce()

    def tick(self) -> None:
        if self.pending_url is not None and time.monotonic() >= self._next_retry:
            self._announce(quiet_failure=True)

    def _announce(self, *, quiet_failure: bool = False) -> None:
        assert self.pending_url is not None
        result: AnnounceResult = announce_url(self.settings, self.pending_url)
        if result.ok:
            detail = _describe(result)
            output.ok(
                self.console,
                f"Control plane at {self.settings.api_local_url} now uses {self.pending_url}"
                f"{detail} (no restart needed).",
            )
            self.pending_url = None
            return
        # The API is often just starting: retry soon, then back off.
        self._next_retry = time.monotonic() + self._retry_delay
        self._retry_delay = min(RETRY_ANNOUNCE_MAX_S, self._retry_delay * 2)
        if not quiet_failure:
            output.warn(
                self.console,
                f"Could not announce the URL: {result.message} Retrying (up to every "
                f"{RETRY_ANNOUNCE_MAX_S:.0f}s) while the tunnel runs.",
            )


def _describe(result: AnnounceResult) -> str:
    body = result.body or {}
    value = body.get("pushed_to")
    return f"; pushed to {value} live worker(s)" if isinstance(value, int) else ""


def publish_once(settings: Settings, env_file: Path, console: Console, url: str) -> int:
    """`inventiv tunnel --set-url`: for a tunnel run elsewhere (a service, a container)."""
    try:
        url = validate_control_plane_url(url)
    except ControlPlaneURLError as exc:
        output.fail(console, str(exc))
        return 2
    changed = set_env_var(env_file, URL_KEY, url)
    where = "written to" if changed else "already in"
    output.ok(console, f"{URL_KEY}={url} {where} {env_file}")
    result = announce_url(settings, url)
    if not result.ok:
        output.fail(console, f"Could not announce the URL: {result.message}")
        return 1
    output.ok(
        console,
        f"Control plane at {settings.api_local_url} now uses {url}{_describe(result)}.",
    )
    return 0
