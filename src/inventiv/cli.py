"""`inventiv`: run a stack, its services, workers and tunnels from one command."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import uvicorn
from rich.console import Console

from inventiv import __version__
from inventiv.admin_cli import call, instances_app, wait_ready
from inventiv.agent.cli import worker
from inventiv.config import ControlPlaneURLError, Settings, load_settings
from inventiv.engines.cli import engine_app
from inventiv.fastlane import RoutesASGI, fastlane_protocol
from inventiv.stack import StackError, StackPaths, probe, start_stack, stop_stack, supervise
from inventiv.tunnel.cli import doctor, expose, tunnel

if TYPE_CHECKING:
    from inventiv.api.app import ApiApp
    from inventiv.orchestrator.app import OrchestratorApp

app = typer.Typer(
    help="Inventiv: a control plane for fleets of GPU inference workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(engine_app, name="engine")
app.add_typer(instances_app, name="instances")
app.command("worker")(worker)
app.command("expose")(expose)
app.command("tunnel")(tunnel)
app.command("doctor")(doctor)

console = Console(soft_wrap=True)  # never break a URL, token or command to copy
err = Console(stderr=True, soft_wrap=True)


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except (ValueError, ControlPlaneURLError) as exc:
        err.print(f"[red]Configuration error:[/red] {exc}")
        raise typer.Exit(code=2) from None


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


@app.command()
def up(
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Run in this terminal; Ctrl-C stops.")
    ] = False,
    local_worker: Annotated[
        bool,
        typer.Option(
            "--local-worker",
            help="Also make sure one local worker (echo engine) runs, and wait until it is ready.",
        ),
    ] = False,
) -> None:
    """Start the orchestrator and the API for this PORT_OFFSET, and wait until both answer."""
    settings = settings_or_exit()
    token, generated = settings.resolve_admin_token()
    if foreground:
        print_stack(settings, token if generated else None)
        raise typer.Exit(code=supervise(settings))
    try:
        started = start_stack(settings, progress=lambda text: err.print(f"  {text}"))
    except StackError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(code=1) from None
    if not started:
        console.print("[yellow]Already running.[/yellow]")
    print_stack(settings, token if generated else None)
    if local_worker:
        ensure_local_worker()


def ensure_local_worker() -> None:
    """One local echo worker, reused if one is already live: `make up` shows the whole loop."""
    live = [
        i
        for i in call("GET", "/api/instances", params={"include_terminated": False})["items"]
        if i["provider"] == "local"
        and i["status"] not in ("terminating",)
        and not i["status"].endswith("failed")
    ]
    if live:
        console.print(f"Local worker {live[0]['id']} is {live[0]['status']}.")
        return
    created = call("POST", "/api/instances", json={"provider": "local", "model": "echo"})
    console.print(f"Starting local worker {created['id']} (echo engine):")
    wait_ready(created["id"], 60.0)
    console.print(
        "Watch it: `.venv/bin/inventiv instances list`, "
        f"`.venv/bin/inventiv instances events {created['id']}`, or {'/docs'} on the API."
    )


def print_stack(settings: Settings, new_token: str | None) -> None:
    paths = StackPaths.of(settings)
    console.print(f"[green]Inventiv stack (PORT_OFFSET={settings.port_offset})[/green]")
    console.print(
        f"  API           {settings.api_local_url}   (docs: {settings.api_local_url}/docs)"
    )
    console.print(f"  Orchestrator  {settings.orchestrator_url}   (loopback only)")
    console.print(f"  Database      {redact(settings.effective_database_url)}")
    console.print(f"  Logs          {paths.log_dir}")
    where = "INVENTIV_ADMIN_TOKEN" if settings.admin_token else settings.admin_token_path
    console.print(f"  Admin token   {where}")
    if new_token:
        console.print(f"  [bold]New admin token (shown once):[/bold] {new_token}")
    url = settings.control_plane_url()
    if url:
        console.print(f"  Workers reach {url}")
    else:
        console.print(
            "  WORKER_CONTROL_PLANE_URL is not set: remote workers cannot reach this stack yet; "
            "run `make tunnel`."
        )


def redact(url: str) -> str:
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


@app.command()
def down() -> None:
    """Stop this PORT_OFFSET's stack."""
    settings = settings_or_exit()
    if stop_stack(settings):
        console.print(f"Stopped the stack on PORT_OFFSET={settings.port_offset}.")
    else:
        console.print(f"No stack running on PORT_OFFSET={settings.port_offset}.")
    workers = local_workers(settings)
    if workers:
        console.print(
            f"{len(workers)} local worker(s) keep running, like remote ones, and reconnect when "
            "the stack is back; `inventiv instances terminate <id>` stops one."
        )


def local_workers(settings: Settings) -> list[str]:
    from inventiv.providers.local import MACHINE_TAGS_ENV, agent_processes

    tag = f"inventiv-stack={settings.effective_stack_id}"
    return [
        env["INSTANCE_ID"]
        for _, env in agent_processes()
        if tag in env.get(MACHINE_TAGS_ENV, "").split(",") and "INSTANCE_ID" in env
    ]


@app.command()
def status() -> None:
    """Show whether the API and the orchestrator answer."""
    settings = settings_or_exit()
    state = probe(settings)
    for name, value in state.items():
        colour = "green" if value == "ok" else "red"
        console.print(f"{name:13} [{colour}]{value}[/{colour}]")
    if state != {"api": "ok", "orchestrator": "ok"}:
        raise typer.Exit(code=1)


@app.command(hidden=True, name="supervise")
def supervise_command() -> None:
    """Run the stack's supervisor in the foreground (what `up` starts in the background)."""
    raise typer.Exit(code=supervise(settings_or_exit()))


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="api or orchestrator")],
    host: Annotated[str | None, typer.Option(help="Bind address")] = None,
    port: Annotated[int | None, typer.Option(help="Port")] = None,
) -> None:
    """Run one service in the foreground (what `up` supervises; containers use this)."""
    settings = settings_or_exit()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if service == "api":
        from inventiv.api.app import create_app as create_api

        application: ApiApp | OrchestratorApp = create_api(settings)
        bind = host or settings.api_bind_host
        listen = port or settings.api_port
    elif service == "orchestrator":
        from inventiv.orchestrator.app import create_app as create_orchestrator

        application = create_orchestrator(settings)
        bind = host or settings.orchestrator_bind_host
        listen = port or settings.orchestrator_port
    else:
        err.print(f"[red]Unknown service {service!r}; use `api` or `orchestrator`.[/red]")
        raise typer.Exit(code=2)
    settings.resolve_admin_token()
    config = uvicorn.Config(
        RoutesASGI(application.route, application.fastapi),
        host=bind,
        port=listen,
        loop="uvloop",
        # FastLane answers the hot routes itself and hands every other connection to uvicorn.
        http=fastlane_protocol(application.route, settings.request_timeout_s),
        access_log=False,
        log_level=settings.log_level,
        timeout_keep_alive=75,
        proxy_headers=False,  # the API sets X-Forwarded-For itself; never trust a client's
        server_header=False,
        date_header=service == "api",  # the orchestrator's answers are re-sent by the API
        lifespan="on",
    )
    sockets = [listen_tcp(bind, listen)]
    unix_path = settings.orchestrator_socket if service == "orchestrator" else None
    if unix_path is not None:
        sockets.append(listen_unix(unix_path))
    # Everything imported so far lives as long as the process: keep it out of the collector's
    # way, so full collections on the request path stay short.
    gc.collect()
    gc.freeze()
    try:
        uvicorn.Server(config).run(sockets=sockets)
    finally:
        if unix_path is not None:
            unix_path.unlink(missing_ok=True)


def listen_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        err.print(f"[red]Cannot listen on {host}:{port}: {exc.strerror}.[/red]")
        raise typer.Exit(code=1) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def listen_unix(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    path.chmod(0o600)
    sock.listen(2048)
    return sock


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the Alembic migrations to DATABASE_URL (the orchestrator also does it at start)."""
    from inventiv.db.engine import create_engine
    from inventiv.db.migrate import current_revision, upgrade_database

    settings = settings_or_exit()

    async def run() -> str | None:
        engine = create_engine(settings.effective_database_url)
        try:
            await upgrade_database(engine)
            return await current_revision(engine)
        finally:
            await engine.dispose()

    revision = asyncio.run(run())
    console.print(f"Database {redact(settings.effective_database_url)} at revision {revision}.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
