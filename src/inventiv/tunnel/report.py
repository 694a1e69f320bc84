"""Print a doctor report for a human (rich) or for a script (one JSON document)."""

from __future__ import annotations

import json

from rich.console import Console
from rich.markup import escape

from inventiv.tunnel.doctor import FAIL, PASS, DoctorReport

_MARKS = {PASS: "[green]PASS[/green]", FAIL: "[red]FAIL[/red]"}


def render_text(report: DoctorReport, console: Console) -> None:
    console.print(
        f"[bold]inventiv doctor[/bold] — API port {report.api_port} "
        f"(PORT_OFFSET={report.port_offset})"
    )
    for check in report.checks:
        mark = _MARKS.get(check.status, "[dim]SKIP[/dim]")
        console.print(f"{mark} {escape(check.title)}: {escape(check.detail)}")
        if check.fix:
            console.print(f"     [bold]fix:[/bold] {escape(check.fix)}")
    failed = [c for c in report.checks if c.status == FAIL]
    if failed:
        console.print(
            f"[red]{len(failed)} check(s) failed.[/red] Fix the first one first: later ones often "
            "follow from it."
        )
    else:
        console.print("[green]All checks passed: workers can reach this control plane.[/green]")


def render_json(report: DoctorReport) -> str:
    return json.dumps(report.to_dict(), indent=2)
