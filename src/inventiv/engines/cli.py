"""`inventiv engine ...`: placeholder until the echo engine lands."""

import typer

engine_app = typer.Typer(help="Inference engines that Inventiv can run.", no_args_is_help=True)
