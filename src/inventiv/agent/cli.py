"""`inventiv worker`: turn options / environment variables into an AgentConfig and run the
agent, exiting with a one-line message (and exit code 2) when a setting is wrong."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from .config import (
    DEFAULT_ENGINE_PORT,
    DEFAULT_HEALTH_HOST,
    DEFAULT_HEALTH_PORT,
    AgentConfig,
    ConfigError,
    EngineKind,
    default_state_dir,
    parse_uuid,
    split_args,
)

LOG_FORMAT = "%(asctime)s inventiv-worker %(levelname)s %(message)s"


def setup_logging(level: str) -> None:
    """One line per state change: silence the per-request INFO lines of httpx and uvicorn."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"inventiv worker: {message}", err=True)
    return typer.Exit(code=2)


def worker(
    instance_id: Annotated[
        str | None,
        typer.Option(envvar="INSTANCE_ID", help="The instance this worker runs for (UUID)."),
    ] = None,
    control_plane_url: Annotated[
        str | None,
        typer.Option(
            envvar="WORKER_CONTROL_PLANE_URL",
            help="Control-plane base URL, e.g. https://xyz.trycloudflare.com (no path).",
        ),
    ] = None,
    control_plane_url_file: Annotated[
        Path | None,
        typer.Option(
            envvar="WORKER_CONTROL_PLANE_URL_FILE",
            help="File holding the URL; wins over the variable, re-read after failed calls.",
        ),
    ] = None,
    bootstrap_token: Annotated[
        str | None,
        typer.Option(
            envvar="INVENTIV_BOOTSTRAP_TOKEN",
            help="One-time token for the first registration (prefer the env var or file).",
            show_default=False,
        ),
    ] = None,
    bootstrap_token_file: Annotated[
        Path | None,
        typer.Option(
            envvar="INVENTIV_BOOTSTRAP_TOKEN_FILE", help="File holding the bootstrap token."
        ),
    ] = None,
    worker_id: Annotated[
        str | None,
        typer.Option(
            envvar="WORKER_ID", help="Worker UUID (default: generated once, kept in the state dir)."
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="WORKER_STATE_DIR",
            help="Where the worker token and id live "
            "(default ~/.local/state/inventiv/worker-<INSTANCE_ID>).",
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option(envvar="WORKER_ENGINE", help="vllm | echo | command | none.")
    ] = EngineKind.VLLM.value,
    model_id: Annotated[
        str | None, typer.Option(envvar="WORKER_MODEL_ID", help="Model the engine serves.")
    ] = None,
    engine_port: Annotated[
        int, typer.Option(envvar="WORKER_ENGINE_PORT", help="Engine port (0 = pick a free one).")
    ] = DEFAULT_ENGINE_PORT,
    engine_api_key: Annotated[
        str | None,
        typer.Option(
            envvar="WORKER_ENGINE_API_KEY", help="API key the engine requires.", show_default=False
        ),
    ] = None,
    engine_args: Annotated[
        str | None,
        typer.Option(envvar="WORKER_ENGINE_ARGS", help="Extra engine flags, shell-quoted."),
    ] = None,
    engine_command: Annotated[
        str | None,
        typer.Option(
            envvar="WORKER_ENGINE_COMMAND",
            help="For WORKER_ENGINE=command: the command line; "
            "{port} {model} {api_key} are replaced.",
        ),
    ] = None,
    health_host: Annotated[
        str, typer.Option(envvar="WORKER_HEALTH_HOST", help="Bind address of the health server.")
    ] = DEFAULT_HEALTH_HOST,
    health_port: Annotated[
        int,
        typer.Option(envvar="WORKER_HEALTH_PORT", help="Health server port (0 = pick a free one)."),
    ] = DEFAULT_HEALTH_PORT,
    advertise_address: Annotated[
        str | None,
        typer.Option(
            envvar="WORKER_ADVERTISE_ADDRESS",
            help="Address the control plane should use to reach this worker.",
        ),
    ] = None,
    orphan_shutdown_s: Annotated[
        float,
        typer.Option(
            envvar="WORKER_ORPHAN_SHUTDOWN_S",
            help="Dead-man switch in seconds (0 = off; 1800 for cloud VMs).",
        ),
    ] = 0.0,
    shutdown_command: Annotated[
        str | None,
        typer.Option(
            envvar="WORKER_SHUTDOWN_COMMAND",
            help="Run by the dead-man switch, e.g. 'shutdown -h now'.",
        ),
    ] = None,
    simulate_gpu: Annotated[
        bool,
        typer.Option(
            envvar="WORKER_SIMULATE_GPU", help="Demo: report a made-up GPU, marked simulated."
        ),
    ] = False,
    ca_bundle: Annotated[
        Path | None,
        typer.Option(
            envvar="WORKER_CA_BUNDLE", help="Extra CA file to trust for an https control plane."
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option(envvar="WORKER_LOG_LEVEL", help="debug | info | warning | error.")
    ] = "info",
) -> None:
    """Run the worker agent next to an inference engine: register, heartbeat, supervise."""
    from .loop import Agent  # keeps `inventiv --help` fast

    setup_logging(log_level)
    try:
        if not instance_id:
            raise ConfigError(
                "INSTANCE_ID is required (the instance id shown by the control plane)."
            )
        instance = parse_uuid("INSTANCE_ID", instance_id)
        try:
            kind = EngineKind(engine.strip().lower())
        except ValueError:
            choices = ", ".join(k.value for k in EngineKind)
            raise ConfigError(f"WORKER_ENGINE must be one of {choices}; got {engine!r}.") from None
        config = AgentConfig(
            instance_id=instance,
            state_dir=(state_dir or default_state_dir(instance)).expanduser(),
            control_plane_url=control_plane_url or None,
            control_plane_url_file=control_plane_url_file,
            bootstrap_token=bootstrap_token or None,
            bootstrap_token_file=bootstrap_token_file,
            worker_id=parse_uuid("WORKER_ID", worker_id) if worker_id else None,
            engine=kind,
            model_id=model_id or None,
            engine_port=engine_port,
            engine_api_key=engine_api_key or None,
            engine_args=split_args("WORKER_ENGINE_ARGS", engine_args),
            engine_command=split_args("WORKER_ENGINE_COMMAND", engine_command),
            health_host=health_host,
            health_port=health_port,
            advertise_address=advertise_address or None,
            orphan_shutdown_s=orphan_shutdown_s,
            shutdown_command=shutdown_command or None,
            simulate_gpu=simulate_gpu,
            ca_bundle=ca_bundle,
        )
        agent = Agent(config)
        agent.prepare()
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    code = asyncio.run(agent.run())
    raise typer.Exit(code=code)


if __name__ == "__main__":  # until the main CLI wires `inventiv worker`
    typer.run(worker)
