"""`inventiv expose|tunnel|doctor`: placeholders until the tunnel module lands."""

import typer


def tunnel() -> None:
    """Run cloudflared for this stack's API port and publish its URL."""
    raise typer.Exit(code=2)


def doctor() -> None:
    """Check every link from a worker to the orchestrator."""
    raise typer.Exit(code=2)


def expose() -> None:
    """Make sure the API answers on 127.0.0.1:(8003+PORT_OFFSET) and print the tunnel command."""
    raise typer.Exit(code=2)
