"""`inventiv expose|tunnel|doctor`: the command-line faces of the tunnel package.

The main CLI registers these three functions; `python -m inventiv.tunnel.cli` runs them alone
(useful before the main CLI registers them, and in tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from inventiv.config import Settings, env_file_path
from inventiv.tunnel import output
from inventiv.tunnel.doctor import run_doctor
from inventiv.tunnel.expose import run_expose
from inventiv.tunnel.publish import publish_once
from inventiv.tunnel.report import render_json, render_text
from inventiv.tunnel.run import NamedOptions, run_tunnel
from inventiv.tunnel.stacksettings import configured_url, load_stack_settings
from inventiv.tunnel.supervisor import SupervisorOptions


def _settings() -> Settings:
    try:
        return load_stack_settings()
    except ValidationError as exc:
        console = output.make_console(stderr=True)
        output.fail(console, f"Invalid settings (environment or env file): {exc}")
        raise typer.Exit(code=2) from exc


def expose() -> None:
    """Make sure the API answers on 127.0.0.1:(8003+PORT_OFFSET) and print the tunnel command."""
    code = run_expose(_settings(), output.make_console())
    raise typer.Exit(code=code)


def tunnel(
    named: Annotated[
        str | None,
        typer.Option("--named", metavar="NAME", help="Run this named tunnel (stable hostname)."),
    ] = None,
    hostname: Annotated[
        str | None,
        typer.Option("--hostname", metavar="HOST", help="Public host of the named tunnel."),
    ] = None,
    credentials_file: Annotated[
        Path | None,
        typer.Option(help="Named tunnel credentials (default: ~/.cloudflared/<UUID>.json)."),
    ] = None,
    publish_gateway: Annotated[
        bool,
        typer.Option("--publish-gateway", help="Named tunnel: also publish the /v1/* gateway."),
    ] = False,
    url_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for cloudflared to come up.", min=1)
    ] = 30.0,
    set_url: Annotated[
        str | None,
        typer.Option(
            "--set-url",
            metavar="URL",
            help="Do not run cloudflared: write and announce URL (a tunnel run elsewhere).",
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Echo all of cloudflared's output.")
    ] = False,
) -> None:
    """Run cloudflared for this stack's API port and publish its URL to env file and workers."""
    console = output.make_console()
    if set_url is not None:
        if named is not None or hostname is not None:
            output.fail(console, "--set-url cannot be combined with --named/--hostname.")
            raise typer.Exit(code=2)
        raise typer.Exit(code=publish_once(_settings(), env_file_path(), console, set_url))
    if (named is None) != (hostname is None):
        output.fail(console, "--named NAME and --hostname HOST go together.")
        raise typer.Exit(code=2)
    if named is None and (credentials_file is not None or publish_gateway):
        output.fail(console, "--credentials-file and --publish-gateway need --named.")
        raise typer.Exit(code=2)
    named_options = (
        None
        if named is None or hostname is None
        else NamedOptions(named, hostname, credentials_file, publish_gateway)
    )
    options = SupervisorOptions(url_timeout_s=url_timeout, echo_all=verbose)
    code = run_tunnel(_settings(), console, named=named_options, options=options)
    raise typer.Exit(code=code)


def doctor(
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON document on stdout.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds per HTTP check.", min=0.1)] = 5.0,
) -> None:
    """Check every link from a worker to the orchestrator and print the fix for each failure."""
    report = run_doctor(_settings(), configured_url(), timeout=timeout)
    if json_output:
        typer.echo(render_json(report))
    else:
        render_text(report, output.make_console())
    raise typer.Exit(code=0 if report.ok else 1)


app = typer.Typer(help="Public reachability of an Inventiv stack.", no_args_is_help=True)
app.command()(expose)
app.command()(tunnel)
app.command()(doctor)

if __name__ == "__main__":
    app()
