"""Settings for one Inventiv stack: ports derived from PORT_OFFSET, data directory, URL rules.

Every process of a stack (API, orchestrator, CLI) reads the same typed object, so the port a
tunnel points at and the port the API listens on can never disagree.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

API_BASE_PORT = 8003
ORCHESTRATOR_BASE_PORT = 8001
DEFAULT_ENV_FILE = "env/dev.env"
ADMIN_TOKEN_FILE = "admin-token"
MAX_BODY_BYTES = 64 * 1024


class ControlPlaneURLError(ValueError):
    """A WORKER_CONTROL_PLANE_URL that breaks one of the seed's rules.

    `rule` names the broken rule and `suggestion` is the corrected value when one can be derived,
    so the message tells the operator exactly what to write instead.
    """

    def __init__(self, rule: str, message: str, suggestion: str | None = None) -> None:
        self.rule = rule
        self.suggestion = suggestion
        text = message if suggestion is None else f"{message} Use: {suggestion}"
        super().__init__(text)


def is_loopback_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_control_plane_url(url: str) -> str:
    """Check a control-plane URL against the seed's rules and return it unchanged.

    Rules: absolute https URL (plain http only for loopback hosts), no trailing slash, no path,
    no query, fragment or credentials. Workers append `/internal/worker/...` themselves.
    """
    raw = url.strip()
    if not raw:
        raise ControlPlaneURLError("empty", "WORKER_CONTROL_PLANE_URL is empty.")
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ControlPlaneURLError(
            "absolute_https",
            f"WORKER_CONTROL_PLANE_URL must be an absolute https:// URL, got {raw!r}.",
            f"https://{raw.split('://')[-1].rstrip('/')}" if raw else None,
        )
    host = parts.hostname or ""
    if not host:
        raise ControlPlaneURLError("host", f"WORKER_CONTROL_PLANE_URL {raw!r} has no host name.")
    if parts.username is not None or parts.password is not None:
        clean = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[1], "", "", ""))
        raise ControlPlaneURLError(
            "no_credentials",
            "WORKER_CONTROL_PLANE_URL must not carry credentials (user:password@); workers "
            "authenticate with their own tokens.",
            clean,
        )
    base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ControlPlaneURLError(
            "https_required",
            "WORKER_CONTROL_PLANE_URL must use https:// (plain http is allowed only for "
            "loopback hosts such as 127.0.0.1; cloudflared always serves https).",
            urlunsplit(("https", parts.netloc, "", "", "")),
        )
    if parts.query or parts.fragment or raw.endswith("?") or raw.endswith("#"):
        raise ControlPlaneURLError(
            "no_query",
            "WORKER_CONTROL_PLANE_URL must not have a query string or fragment.",
            base,
        )
    if parts.path == "/":
        raise ControlPlaneURLError(
            "no_trailing_slash",
            "WORKER_CONTROL_PLANE_URL must not end with a slash (/).",
            base,
        )
    if parts.path:
        raise ControlPlaneURLError(
            "no_path",
            f"WORKER_CONTROL_PLANE_URL must not have a path ({parts.path!r}); workers add "
            "/internal/worker/... themselves.",
            base,
        )
    try:
        parts.port  # noqa: B018 - raises on an invalid port
    except ValueError as exc:
        raise ControlPlaneURLError(
            "port", f"WORKER_CONTROL_PLANE_URL has an invalid port: {exc}."
        ) from exc
    return raw


def read_url_file(path: Path) -> str | None:
    """Return the URL held in a *_URL_FILE, or None when the file is absent or empty."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def env_file_path() -> Path:
    return Path(os.environ.get("INVENTIV_ENV_FILE", DEFAULT_ENV_FILE))


class Settings(BaseSettings):
    """One stack's configuration, from the environment first, then env/dev.env."""

    model_config = SettingsConfigDict(
        env_file=DEFAULT_ENV_FILE, env_file_encoding="utf-8", extra="ignore"
    )

    port_offset: int = Field(default=0, alias="PORT_OFFSET", ge=0, le=50000)
    api_host_port: int | None = Field(default=None, alias="API_HOST_PORT", ge=1, le=65535)
    api_bind_host: str = Field(default="127.0.0.1", alias="INVENTIV_API_BIND")
    orchestrator_host: str = Field(default="127.0.0.1", alias="INVENTIV_ORCHESTRATOR_HOST")
    orchestrator_bind_host: str = Field(default="127.0.0.1", alias="INVENTIV_ORCHESTRATOR_BIND")
    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    data_dir_override: Path | None = Field(default=None, alias="INVENTIV_DATA_DIR")
    worker_control_plane_url: str | None = Field(default=None, alias="WORKER_CONTROL_PLANE_URL")
    worker_control_plane_url_file: Path | None = Field(
        default=None, alias="WORKER_CONTROL_PLANE_URL_FILE"
    )
    admin_token: str | None = Field(default=None, alias="INVENTIV_ADMIN_TOKEN")
    stack_id: str | None = Field(default=None, alias="INVENTIV_STACK_ID")

    heartbeat_interval_s: float = Field(default=3.0, alias="INVENTIV_HEARTBEAT_INTERVAL_S", gt=0)
    heartbeat_grace_s: float = Field(default=7.0, alias="INVENTIV_HEARTBEAT_GRACE_S", gt=0)
    heartbeat_flush_s: float = Field(default=0.2, alias="INVENTIV_HEARTBEAT_FLUSH_S", gt=0)
    watchdog_period_s: float = Field(default=1.0, alias="INVENTIV_WATCHDOG_PERIOD_S", gt=0)
    unreachable_terminate_s: float = Field(
        default=1800.0, alias="INVENTIV_UNREACHABLE_TERMINATE_S", gt=0
    )
    startup_timeout_s: float = Field(default=1200.0, alias="INVENTIV_STARTUP_TIMEOUT_S", gt=0)
    provisioning_timeout_s: float = Field(
        default=600.0, alias="INVENTIV_PROVISIONING_TIMEOUT_S", gt=0
    )
    bootstrap_token_ttl_s: float = Field(
        default=7200.0, alias="INVENTIV_BOOTSTRAP_TOKEN_TTL_S", gt=0
    )
    orphan_grace_s: float = Field(default=300.0, alias="INVENTIV_ORPHAN_GRACE_S", ge=0)
    reconcile_period_s: float = Field(default=30.0, alias="INVENTIV_RECONCILE_PERIOD_S", gt=0)
    job_period_s: float = Field(default=1.0, alias="INVENTIV_JOB_PERIOD_S", gt=0)
    proxy_timeout_s: float = Field(default=10.0, alias="INVENTIV_PROXY_TIMEOUT_S", gt=0)
    request_timeout_s: float = Field(default=30.0, alias="INVENTIV_REQUEST_TIMEOUT_S", gt=0)
    log_level: str = Field(default="info", alias="INVENTIV_LOG_LEVEL")

    scaleway_access_key: str | None = Field(default=None, alias="SCW_ACCESS_KEY")
    scaleway_secret_key: str | None = Field(default=None, alias="SCW_SECRET_KEY")
    scaleway_project_id: str | None = Field(default=None, alias="SCW_DEFAULT_PROJECT_ID")
    scaleway_zone: str = Field(default="fr-par-2", alias="SCW_DEFAULT_ZONE")

    @field_validator("worker_control_plane_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return validate_control_plane_url(value)

    @property
    def api_port(self) -> int:
        return self.api_host_port or API_BASE_PORT + self.port_offset

    @property
    def orchestrator_port(self) -> int:
        return ORCHESTRATOR_BASE_PORT + self.port_offset

    @property
    def api_local_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def orchestrator_url(self) -> str:
        return f"http://{self.orchestrator_host}:{self.orchestrator_port}"

    @property
    def orchestrator_socket(self) -> Path | None:
        """A Unix socket beside the TCP port, for the API in the same data directory: the hop
        skips the loopback TCP stack. None when the path is too long for a socket address."""
        path = self.data_dir / "run" / "orchestrator.sock"
        return path if len(str(path)) < 100 else None

    @cached_property
    def data_dir(self) -> Path:
        """Each PORT_OFFSET gets its own directory, so two stacks never share a database."""
        if self.data_dir_override is not None:
            path = self.data_dir_override
        else:
            path = Path.cwd() / ".inventiv" / f"stack-{self.port_offset}"
        path = path.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'inventiv.db'}"

    @property
    def effective_stack_id(self) -> str:
        """A stable id tagged on every machine this stack creates, so stacks never reap each
        other's machines."""
        if self.stack_id:
            return self.stack_id
        path = self.data_dir / "stack-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            value = f"inventiv-{secrets.token_hex(4)}"
            write_private_file(path, value + "\n")
            return value

    def control_plane_url(self) -> str | None:
        """The URL workers use, the *_FILE variant winning, re-read on every call."""
        if self.worker_control_plane_url_file is not None:
            value = read_url_file(self.worker_control_plane_url_file)
            if value:
                return validate_control_plane_url(value)
        return self.worker_control_plane_url

    def resolve_admin_token(self) -> tuple[str, bool]:
        """The operator's token: from the environment, else from the data directory, else new.

        Returns the token and whether it was generated now (so the caller prints it once).
        """
        if self.admin_token:
            return self.admin_token, False
        path = self.admin_token_path
        try:
            existing = path.read_text().strip()
        except FileNotFoundError:
            existing = ""
        if existing:
            return existing, False
        token = "ivt_admin_" + secrets.token_urlsafe(32)
        write_private_file(path, token + "\n")
        return token, True

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / ADMIN_TOKEN_FILE


def write_private_file(path: Path, content: str) -> None:
    """Write a secret atomically with mode 0600 from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, content.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class SettingsError(ValueError):
    """Invalid configuration, one line per broken variable, each saying what to fix."""


def load_settings(**overrides: object) -> Settings:
    """Build settings, honouring INVENTIV_ENV_FILE for the env file location."""
    try:
        return Settings(_env_file=env_file_path(), **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            message = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{name}: {message}")
        raise SettingsError("\n".join(lines)) from None
