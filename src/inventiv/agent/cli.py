"""`inventiv worker`: placeholder until the agent lands."""

import typer


def worker() -> None:
    """Run the worker agent next to an inference engine."""
    raise typer.Exit(code=2)
