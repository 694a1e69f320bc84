"""`inventiv engine ...`: the inference engines Inventiv can start on a worker.

Only the echo test engine lives here; real vLLM is started as `vllm serve` by the worker agent.
Every option also reads an environment variable, so a container or a systemd unit can configure
the engine without rewriting its command line.
"""

from __future__ import annotations

from typing import Annotated

import typer

from inventiv.engines import echo as echo_engine

engine_app = typer.Typer(help="Inference engines that Inventiv can run.", no_args_is_help=True)

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@engine_app.callback()
def engine() -> None:
    """Inference engines that Inventiv can run."""
    # An explicit callback keeps `engine_app` a command group even with a single command, so
    # `inventiv engine echo ...` parses the same whether it is mounted or invoked on its own.


@engine_app.command("echo")
def echo(
    host: Annotated[
        str, typer.Option(envvar="INVENTIV_ECHO_HOST", help="Interface to listen on.")
    ] = echo_engine.DEFAULT_HOST,
    port: Annotated[
        int,
        typer.Option(envvar="INVENTIV_ECHO_PORT", min=1, max=65535, help="TCP port to listen on."),
    ] = echo_engine.DEFAULT_PORT,
    model: Annotated[
        str,
        typer.Option(envvar="INVENTIV_ECHO_MODEL", help="Model id served, as vLLM's --model."),
    ] = echo_engine.DEFAULT_MODEL,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar=["INVENTIV_ECHO_API_KEY", "VLLM_API_KEY"],
            help="When set, /v1/* requires 'Authorization: Bearer <key>' (like vllm --api-key).",
            show_default=False,
        ),
    ] = None,
    token_delay_ms: Annotated[
        float,
        typer.Option(
            envvar="INVENTIV_ECHO_TOKEN_DELAY_MS", min=0.0, help="Delay per generated token."
        ),
    ] = echo_engine.DEFAULT_TOKEN_DELAY_MS,
    startup_delay_s: Annotated[
        float,
        typer.Option(
            envvar="INVENTIV_ECHO_STARTUP_DELAY_S",
            min=0.0,
            help="Simulated model loading: /health is 503 and /v1/models empty until it ends.",
        ),
    ] = 0.0,
    max_concurrency: Annotated[
        int,
        typer.Option(
            envvar="INVENTIV_ECHO_MAX_CONCURRENCY",
            min=0,
            help="Requests generated at once; more wait as vllm:num_requests_waiting. 0: none.",
        ),
    ] = 0,
    log_level: Annotated[
        str,
        typer.Option(
            envvar="INVENTIV_ECHO_LOG_LEVEL",
            help=f"uvicorn log level: {', '.join(_LOG_LEVELS)}.",
        ),
    ] = "info",
) -> None:
    """Run the echo test engine: an OpenAI/vLLM-compatible server that echoes prompts back."""
    if log_level.lower() not in _LOG_LEVELS:
        raise typer.BadParameter(
            f"must be one of {', '.join(_LOG_LEVELS)}", param_hint="--log-level"
        )
    try:
        config = echo_engine.EchoConfig(
            model=model,
            api_key=api_key or None,
            token_delay_ms=token_delay_ms,
            startup_delay_s=startup_delay_s,
            max_concurrency=max_concurrency,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    echo_engine.run(config, host=host, port=port, log_level=log_level.lower())
