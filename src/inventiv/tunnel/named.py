"""Named Cloudflare tunnels: a stable hostname that publishes only what workers need.

A quick tunnel forwards everything, admin API included (it is protected by the admin token,
but still reachable). A named tunnel is meant to last, so its ingress publishes only the worker
protocol (`/internal/worker/*`) and, on request, the OpenAI-compatible gateway (`/v1/*`); every
other path gets a 404 from Cloudflare's edge and never reaches the API.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import yaml

from inventiv.config import Settings, validate_control_plane_url
from inventiv.tunnel.cloudflared import origin_url

WORKER_PATH_RULE = r"^/internal/worker/"
GATEWAY_PATH_RULE = r"^/v1/"
CATCH_ALL_SERVICE = "http_status:404"
DEFAULT_CREDENTIAL_DIRS = (
    Path("~/.cloudflared"),
    Path("/etc/cloudflared"),
    Path("/usr/local/etc/cloudflared"),
)
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class NamedTunnelError(ValueError):
    """A named-tunnel setting that cannot work; the message says what to run instead."""


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise NamedTunnelError(
            f"invalid tunnel name {name!r}: use letters, digits, '.', '_' or '-' "
            "(the name given to `cloudflared tunnel create`)."
        )
    return name


def check_hostname(hostname: str) -> str:
    """A bare DNS name. `https://host/` is refused with the bare form to use instead."""
    bare = hostname.strip()
    if "://" in bare or "/" in bare:
        cleaned = bare.split("://", 1)[-1].split("/", 1)[0]
        raise NamedTunnelError(
            f"--hostname takes a bare host name, not a URL: use --hostname {cleaned}"
        )
    if not _HOST_RE.match(bare):
        raise NamedTunnelError(f"invalid --hostname {hostname!r}: expected e.g. cp.example.com")
    return bare.lower()


def public_url(hostname: str) -> str:
    """The stable WORKER_CONTROL_PLANE_URL for a named tunnel."""
    return validate_control_plane_url(f"https://{check_hostname(hostname)}")


def build_config(
    name: str,
    hostname: str,
    api_port: int,
    credentials_file: Path,
    *,
    publish_gateway: bool = False,
) -> dict[str, Any]:
    """The cloudflared config as data: tunnel, credentials-file, path-restricted ingress."""
    host = check_hostname(hostname)
    service = origin_url(api_port)
    rules: list[dict[str, str]] = [{"hostname": host, "path": WORKER_PATH_RULE, "service": service}]
    if publish_gateway:
        rules.append({"hostname": host, "path": GATEWAY_PATH_RULE, "service": service})
    rules.append({"service": CATCH_ALL_SERVICE})
    return {
        "tunnel": check_name(name),
        "credentials-file": str(credentials_file),
        "ingress": rules,
    }


def render_config(config: dict[str, Any]) -> str:
    header = (
        "# Written by `inventiv tunnel --named`; regenerated on every run, edit the command's\n"
        "# options rather than this file. Only worker paths reach the API: the admin API is\n"
        "# never published on the tunnel's hostname.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def config_path(settings: Settings, name: str) -> Path:
    return settings.data_dir / f"cloudflared-{check_name(name)}.yml"


def write_config(settings: Settings, config: dict[str, Any]) -> Path:
    path = config_path(settings, str(config["tunnel"]))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_config(config), encoding="utf-8")
    tmp.replace(path)
    return path


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _tunnel_id_from_cloudflared(binary: str, name: str) -> str | None:
    """Ask cloudflared (logged in with `cloudflared tunnel login`) for the tunnel's UUID."""
    try:
        result = subprocess.run(
            [binary, "tunnel", "list", "--output", "json", "--name", name],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        tunnels = json.loads(result.stdout or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    for item in tunnels if isinstance(tunnels, list) else []:
        if isinstance(item, dict) and item.get("name") == name and item.get("id"):
            return str(item["id"])
    return None


def resolve_credentials_file(binary: str, name: str, explicit: Path | None) -> Path:
    """Find `<TUNNEL-UUID>.json` (written by `cloudflared tunnel create NAME`)."""
    if explicit is not None:
        path = explicit.expanduser()
        if not path.is_file():
            raise NamedTunnelError(f"--credentials-file {path} does not exist.")
        return path.resolve()
    tunnel_id = name if _is_uuid(name) else _tunnel_id_from_cloudflared(binary, name)
    if tunnel_id is not None:
        for directory in DEFAULT_CREDENTIAL_DIRS:
            candidate = directory.expanduser() / f"{tunnel_id}.json"
            if candidate.is_file():
                return candidate.resolve()
    raise NamedTunnelError(
        f"no credentials found for tunnel {name!r}. Create the tunnel and its DNS route first:\n"
        "    cloudflared tunnel login\n"
        f"    cloudflared tunnel create {name}\n"
        f"    cloudflared tunnel route dns {name} <hostname>\n"
        "or pass --credentials-file ~/.cloudflared/<TUNNEL-UUID>.json"
    )


def ingress_ports(config: dict[str, Any]) -> list[int]:
    """The loopback ports a cloudflared config forwards to (for `inventiv doctor`)."""
    ports: list[int] = []
    for rule in config.get("ingress") or []:
        service = str(rule.get("service", "")) if isinstance(rule, dict) else ""
        match = re.match(r"^https?://[^/:]+:(\d+)", service)
        if match:
            ports.append(int(match.group(1)))
    return ports
