"""The agent's settings as one typed, validated object, so every other module can trust them."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from uuid import UUID

DEFAULT_ENGINE_PORT = 8000
DEFAULT_HEALTH_PORT = 8081
DEFAULT_HEALTH_HOST = "0.0.0.0"


class ConfigError(Exception):
    """A setting the agent cannot start with; the message names it and says how to fix it."""


class EngineKind(StrEnum):
    """Which inference engine the agent runs (and supervises) next to itself."""

    VLLM = "vllm"
    ECHO = "echo"
    COMMAND = "command"
    NONE = "none"


def default_state_dir(instance_id: UUID) -> Path:
    """Per-instance, so two agents on one machine (local provider) never share a token."""
    return Path.home() / ".local" / "state" / "inventiv" / f"worker-{instance_id}"


def parse_uuid(name: str, value: str) -> UUID:
    try:
        return UUID(value.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a UUID, got {value!r}.") from None


def split_args(name: str, value: str | None) -> tuple[str, ...]:
    """Shell-like splitting, so quoted values with spaces survive an env var."""
    if not value:
        return ()
    try:
        return tuple(shlex.split(value))
    except ValueError as exc:
        raise ConfigError(f"{name} cannot be parsed as shell words: {exc}.") from None


@dataclass(frozen=True)
class AgentConfig:
    """Everything `inventiv worker` needs; built by the CLI from options / environment.

    The tuning fields at the end have no environment variable: they exist so tests can run the
    same code paths in seconds instead of minutes.
    """

    instance_id: UUID
    state_dir: Path
    control_plane_url: str | None = None
    control_plane_url_file: Path | None = None
    bootstrap_token: str | None = None
    bootstrap_token_file: Path | None = None
    worker_id: UUID | None = None
    engine: EngineKind = EngineKind.VLLM
    model_id: str | None = None
    engine_port: int = DEFAULT_ENGINE_PORT
    engine_api_key: str | None = None
    engine_args: tuple[str, ...] = ()
    engine_command: tuple[str, ...] = ()
    health_host: str = DEFAULT_HEALTH_HOST
    health_port: int = DEFAULT_HEALTH_PORT
    advertise_address: str | None = None
    orphan_shutdown_s: float = 0.0
    shutdown_command: str | None = None
    simulate_gpu: bool = False
    ca_bundle: Path | None = None

    http_timeout_s: float = 10.0
    retry_base_s: float = 0.5
    retry_cap_s: float = 60.0
    engine_stop_timeout_s: float = 15.0
    engine_restart_base_s: float = 1.0
    engine_restart_cap_s: float = 60.0
    engine_crash_limit: int = 3
    ready_probe_interval_s: float = 0.25
    extra_engine_env: dict[str, str] = field(default_factory=dict)

    def check(self) -> AgentConfig:
        """Refuse combinations that could only fail later, with a message naming the setting."""
        if self.control_plane_url is None and self.control_plane_url_file is None:
            raise ConfigError(
                "Set WORKER_CONTROL_PLANE_URL (e.g. https://xyz.trycloudflare.com) or "
                "WORKER_CONTROL_PLANE_URL_FILE (a file holding it)."
            )
        if self.engine in (EngineKind.VLLM, EngineKind.ECHO) and not self.model_id:
            raise ConfigError(f"WORKER_ENGINE={self.engine} needs WORKER_MODEL_ID.")
        if self.engine is EngineKind.COMMAND and not self.engine_command:
            raise ConfigError("WORKER_ENGINE=command needs WORKER_ENGINE_COMMAND.")
        for name, port in (
            ("WORKER_ENGINE_PORT", self.engine_port),
            ("WORKER_HEALTH_PORT", self.health_port),
        ):
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be a port number (0-65535), got {port}.")
        if self.orphan_shutdown_s < 0:
            raise ConfigError("WORKER_ORPHAN_SHUTDOWN_S must be >= 0 (0 turns it off).")
        if self.ca_bundle is not None and not self.ca_bundle.is_file():
            raise ConfigError(f"WORKER_CA_BUNDLE {str(self.ca_bundle)!r} is not a readable file.")
        return self
