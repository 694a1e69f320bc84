"""`inventiv tunnel`: run cloudflared for this stack and keep WORKER_CONTROL_PLANE_URL true.

The origin port comes from the same Settings the API uses (8003 + PORT_OFFSET, or
API_HOST_PORT), so the tunnel can never point at another stack's port by mistake.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from rich.console import Console

from inventiv.config import Settings, env_file_path
from inventiv.tunnel import output
from inventiv.tunnel.cloudflared import (
    CloudflaredNotFound,
    find_cloudflared,
    named_tunnel_command,
    quick_tunnel_command,
)
from inventiv.tunnel.expose import probe_local_api
from inventiv.tunnel.named import (
    NamedTunnelError,
    build_config,
    public_url,
    resolve_credentials_file,
    write_config,
)
from inventiv.tunnel.process import CloudflaredProcess
from inventiv.tunnel.publish import TunnelState, URLPublisher, read_state
from inventiv.tunnel.stacksettings import URL_KEY
from inventiv.tunnel.supervisor import Supervisor, SupervisorOptions

# What cloudflared logs once a named tunnel's connection to the edge is up (old and new forms).
_REGISTERED_RE = re.compile(r"Registered tunnel connection|Connection \S+ registered")


@dataclass(frozen=True)
class NamedOptions:
    name: str
    hostname: str
    credentials_file: Path | None = None
    publish_gateway: bool = False


def _binary(console: Console) -> str | None:
    try:
        return find_cloudflared()
    except CloudflaredNotFound as exc:
        output.fail(console, str(exc))
        return None


def running_tunnel(settings: Settings) -> TunnelState | None:
    """The `inventiv tunnel` already serving this stack, if any (pid reuse is ruled out by
    checking the process is still an `inventiv ... tunnel`)."""
    state = read_state(settings)
    if state is None or state.supervisor_pid == os.getpid():
        return None
    try:
        cmdline = psutil.Process(state.supervisor_pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return state if "tunnel" in cmdline else None


def _warn_if_api_down(settings: Settings, console: Console) -> None:
    found = probe_local_api(settings)
    if not found.is_inventiv_api:
        output.warn(
            console,
            f"The API does not answer on {settings.api_local_url} ({found.describe()}). The tunnel "
            "starts anyway, but workers get errors until you run `make api-expose`.",
        )


def run_tunnel(
    settings: Settings,
    console: Console,
    *,
    named: NamedOptions | None = None,
    options: SupervisorOptions | None = None,
) -> int:
    """Run and supervise cloudflared until interrupted; non-zero if it never came up."""
    other = running_tunnel(settings)
    if other is not None:
        output.fail(
            console,
            f"`inventiv tunnel` already runs for this stack (pid {other.supervisor_pid}, "
            f"{other.url}); two tunnels would fight over {URL_KEY}. Stop it first "
            f"(kill {other.supervisor_pid}), or use another PORT_OFFSET.",
        )
        return 1
    binary = _binary(console)
    if binary is None:
        return 1
    options = options or SupervisorOptions()
    _warn_if_api_down(settings, console)
    if named is None:
        argv = quick_tunnel_command(binary, settings.api_port)
        mode = "quick"

        def url_source(proc: CloudflaredProcess, on_wait: Callable[[float], None]) -> str:
            return proc.wait_for_quick_url(timeout=options.url_timeout_s, on_wait=on_wait)

    else:
        try:
            url = public_url(named.hostname)
            credentials = resolve_credentials_file(binary, named.name, named.credentials_file)
            config = build_config(
                named.name,
                named.hostname,
                settings.api_port,
                credentials,
                publish_gateway=named.publish_gateway,
            )
        except NamedTunnelError as exc:
            output.fail(console, str(exc))
            return 2
        path = write_config(settings, config)
        output.ok(console, f"cloudflared config written to {path} (worker paths only)")
        argv = named_tunnel_command(binary, str(path), named.name)
        mode = "named"

        def url_source(proc: CloudflaredProcess, on_wait: Callable[[float], None]) -> str:
            proc.wait_for_line(
                lambda line: line if _REGISTERED_RE.search(line) else None,
                timeout=options.url_timeout_s,
                on_wait=on_wait,
                what="registered tunnel connection",
            )
            return url

    output.info(console, "Starting: " + " ".join(["cloudflared", *argv[1:]]))
    publisher = URLPublisher(settings, env_file_path(), console, mode=mode)
    supervisor = Supervisor(argv, url_source, publisher, console, options)
    supervisor.install_signal_handlers()
    return supervisor.run()
