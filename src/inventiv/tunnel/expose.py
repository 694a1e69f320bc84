"""`inventiv expose` (`make api-expose`): make the API answer on 127.0.0.1:<api port>.

cloudflared can only forward to a port something listens on; this command guarantees that port
is the stack's own API (started if needed, left alone if already up) and prints the exact
cloudflared command for that port, so the two can never disagree.
"""

from __future__ import annotations

from rich.console import Console

from inventiv.config import Settings
from inventiv.stack import StackError, start_stack
from inventiv.tunnel import output
from inventiv.tunnel.cloudflared import quick_tunnel_command_text
from inventiv.tunnel.probe import Probe, probe

PROBE_TIMEOUT_S = 3.0


def probe_local_api(settings: Settings) -> Probe:
    return probe(settings.api_local_url + "/", local=True, timeout=PROBE_TIMEOUT_S)


def other_program_message(settings: Settings, found: Probe) -> str:
    return (
        f"Port {settings.api_port} answers ({found.describe()}) but not as the Inventiv API. "
        f"Stop the program using it, or pick another port: PORT_OFFSET=<n> (API on 8003+n) or "
        f"API_HOST_PORT=<port>."
    )


def _start_stack(settings: Settings, console: Console) -> bool:
    output.info(console, f"API not running on {settings.api_local_url}: starting the stack...")
    try:
        start_stack(settings, progress=lambda text: output.info(console, f"  {text}"))
    except (StackError, OSError) as exc:
        output.fail(console, f"Starting the stack failed: {exc}")
        return False
    return True


def run_expose(settings: Settings, console: Console) -> int:
    """Idempotent: a running API is reported, not restarted. Exit status 0 when it answers."""
    found = probe_local_api(settings)
    if found.is_inventiv_api:
        output.ok(console, f"API already running on {settings.api_local_url}")
    elif found.answered:
        output.fail(console, other_program_message(settings, found))
        return 1
    else:
        if not _start_stack(settings, console):
            return 1
        found = probe_local_api(settings)
        if not found.is_inventiv_api:
            output.fail(
                console,
                f"The stack was started but {settings.api_local_url}/ does not answer as the "
                f"Inventiv API ({found.describe()}). Check the logs in {settings.data_dir}.",
            )
            return 1
        output.ok(console, f"API started on {settings.api_local_url}")
    orchestrator = found.json_dict.get("orchestrator")
    if orchestrator != "ok":
        output.warn(
            console,
            f"The API reports the orchestrator as {orchestrator!r}: run `inventiv doctor`.",
        )
    console.print(f"Local API URL: [bold]{settings.api_local_url}[/bold]")
    output.info(console, "Publish it with a Cloudflare quick tunnel (keep that terminal open):")
    output.command(console, quick_tunnel_command_text(settings.api_port))
    output.info(
        console,
        "or let Inventiv run it, write WORKER_CONTROL_PLANE_URL and tell the control plane:",
    )
    prefix = f"PORT_OFFSET={settings.port_offset} " if settings.port_offset else ""
    output.command(console, f"{prefix}make tunnel    # = {prefix}inventiv tunnel")
    return 0
