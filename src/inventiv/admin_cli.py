"""`inventiv instances ...`: the admin API from the terminal, with the stack's own token."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from inventiv.config import Settings, load_settings

instances_app = typer.Typer(
    help="Create, list, watch and terminate instances.", no_args_is_help=True
)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def client(settings: Settings | None = None) -> httpx.Client:
    settings = settings or load_settings()
    token, _ = settings.resolve_admin_token()
    return httpx.Client(
        base_url=settings.api_local_url,
        headers={"authorization": f"Bearer {token}"},
        timeout=15.0,
        trust_env=False,
    )


def call(method: str, path: str, **kwargs: Any) -> Any:
    """One admin call; an error answer or an unreachable API ends the command with its message."""
    try:
        with client() as http:
            response = http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        err.print(f"[red]The API does not answer ({exc}); start it with `make up`.[/red]")
        raise typer.Exit(code=1) from None
    if response.status_code >= 400:
        try:
            body = response.json()
            err.print(f"[red]{body['error']}[/red]: {body['message']}")
        except (ValueError, KeyError):
            err.print(f"[red]HTTP {response.status_code}[/red]: {response.text[:300]}")
        raise typer.Exit(code=1)
    return response.json()


def wait_ready(instance_id: str, timeout_s: float) -> dict[str, Any]:
    """Follow an instance until ready (or failed), printing each state change with its progress."""
    deadline = time.monotonic() + timeout_s
    last = ""
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = call("GET", f"/api/instances/{instance_id}")
        if view["status"] != last:
            last = view["status"]
            console.print(f"  {view['progress']:3d}%  {last}")
        if last == "ready" or last.endswith("failed") or last == "terminated":
            return view
        time.sleep(0.2)
    err.print(
        f"[yellow]Still {last} after {timeout_s:g} s; follow it with "
        f"`inventiv instances events {instance_id}`.[/yellow]"
    )
    return view


@instances_app.command("create")
def create(
    provider: Annotated[str, typer.Option(help="manual, local or scaleway")] = "local",
    model: Annotated[str, typer.Option(help="Model id, or 'echo' for the test engine")] = "echo",
    wait: Annotated[bool, typer.Option(help="Follow it until ready")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait")] = 120.0,
) -> None:
    """Create an instance (a local echo worker by default)."""
    created = call("POST", "/api/instances", json={"provider": provider, "model": model})
    console.print(f"Instance [bold]{created['id']}[/bold] ({provider}, {model})")
    if created.get("agent_env"):
        console.print("Start the agent on your machine with this environment (token shown once):")
        for key, value in created["agent_env"].items():
            console.print(f"  export {key}={value}")
        console.print("  inventiv worker")
        for warning in created.get("warnings", []):
            console.print(f"[yellow]{warning}[/yellow]")
    if wait and provider != "manual":
        wait_ready(created["id"], timeout)


@instances_app.command("list")
def list_instances(
    all_: Annotated[bool, typer.Option("--all", help="Include terminated instances")] = False,
) -> None:
    """List instances with their state, last heartbeat and load."""
    items = call("GET", "/api/instances", params={"include_terminated": all_})["items"]
    table = Table(box=None)
    for name in ("status", "progress", "heartbeat", "queue", "provider", "model", "id"):
        table.add_column(name, no_wrap=True)
    for item in items:
        table.add_row(
            item["status"] + (f" ({item['error_code']})" if item["error_code"] else ""),
            f"{item['progress']}%",
            age(item["last_heartbeat_at"]),
            str(item["queue_depth"] if item["queue_depth"] is not None else "-"),
            item["provider"],
            item["model"],
            item["id"],
        )
    Console(width=max(console.width, 120)).print(table)


def age(timestamp: str | None) -> str:
    if not timestamp:
        return "-"
    seconds = (datetime.now(UTC) - datetime.fromisoformat(timestamp)).total_seconds()
    return f"{seconds:.1f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


@instances_app.command("show")
def show(instance_id: str) -> None:
    """Everything known about one instance, as JSON."""
    console.print_json(json.dumps(call("GET", f"/api/instances/{instance_id}")))


@instances_app.command("events")
def events(instance_id: str) -> None:
    """The instance's history: state changes with reasons, registrations, tokens, errors."""
    for event in call("GET", f"/api/instances/{instance_id}/events")["items"]:
        change = f"{event['from_status']} -> {event['to_status']}" if event["to_status"] else ""
        console.print(
            f"{event['at']}  {event['kind']:16} {change:26} {event['reason'] or '':22} "
            f"{event['message'] or ''}"
        )


@instances_app.command("terminate")
def terminate(instance_id: str) -> None:
    """Terminate an instance: its machine is released and its tokens revoked."""
    view = call("DELETE", f"/api/instances/{instance_id}")
    console.print(f"{instance_id}: {view['status']}")
