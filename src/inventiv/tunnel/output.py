"""One console for the tunnel commands: rich for humans, never wrapped, so a URL or a command
to copy always stays on one line (and tests can find it in captured output)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape


def make_console(*, stderr: bool = False) -> Console:
    return Console(stderr=stderr, soft_wrap=True, highlight=False)


def ok(console: Console, text: str) -> None:
    console.print(f"[green]✓[/green] {escape(text)}")


def info(console: Console, text: str) -> None:
    console.print(escape(text))


def warn(console: Console, text: str) -> None:
    console.print(f"[yellow]![/yellow] {escape(text)}")


def fail(console: Console, text: str) -> None:
    console.print(f"[red]✗[/red] {escape(text)}")


def command(console: Console, text: str) -> None:
    """A line the operator is meant to copy: indented, bold, nothing else on it."""
    console.print(f"    [bold]{escape(text)}[/bold]")
