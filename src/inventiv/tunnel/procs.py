"""Find the cloudflared processes on this machine and the ports they forward to.

"Is cloudflared still running, and on the right port?" are the first two questions of the
troubleshooting guide; answering them from the process table works for a cloudflared started
by `inventiv tunnel`, by hand in another terminal, or as a service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import yaml

from inventiv.tunnel.cloudflared import BINARY_NAME
from inventiv.tunnel.named import ingress_ports


@dataclass(frozen=True)
class CloudflaredProc:
    pid: int
    cmdline: list[str]
    origin: str | None = None  # the --url value, for a quick tunnel
    config: str | None = None  # the --config value, for a named tunnel
    ports: list[int] = field(default_factory=list)

    @property
    def command(self) -> str:
        return " ".join(self.cmdline)


def _option(args: list[str], name: str) -> str | None:
    """Value of `--name X` or `--name=X` (cloudflared accepts both, and a single dash)."""
    for index, arg in enumerate(args):
        for flag in (f"--{name}", f"-{name}"):
            if arg == flag and index + 1 < len(args):
                return args[index + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def origin_port(origin: str) -> int | None:
    """Port of a --url origin; cloudflared accepts `localhost:8003` without a scheme."""
    text = origin if "://" in origin else f"http://{origin}"
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        return None
    if port is not None:
        return port
    return {"http": 80, "https": 443}.get(parts.scheme)


def _config_ports(path: str) -> list[int]:
    try:
        data = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    return ingress_ports(data) if isinstance(data, dict) else []


def _is_cloudflared(name: str, cmdline: list[str]) -> list[str] | None:
    """The argv after the cloudflared executable, or None if this is not cloudflared.

    A script stand-in runs as `<interpreter> <path>/cloudflared ...`, a real one as
    `<path>/cloudflared ...`; both count.
    """
    for index, arg in enumerate(cmdline[:2]):
        if os.path.basename(arg) == BINARY_NAME:
            return cmdline[index + 1 :]
    if name == BINARY_NAME and cmdline:
        return cmdline[1:]
    return None


def describe_process(pid: int, name: str, cmdline: list[str]) -> CloudflaredProc | None:
    args = _is_cloudflared(name, cmdline)
    if args is None or "tunnel" not in args:
        return None
    origin = _option(args, "url")
    config = _option(args, "config")
    ports: list[int] = []
    if origin is not None:
        port = origin_port(origin)
        ports = [port] if port is not None else []
    elif config is not None:
        ports = _config_ports(config)
    return CloudflaredProc(pid, cmdline, origin, config, ports)


def find_cloudflared() -> list[CloudflaredProc]:
    found: list[CloudflaredProc] = []
    own = os.getpid()
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        info = proc.info
        if info["pid"] == own or not info.get("cmdline"):
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        described = describe_process(info["pid"], info.get("name") or "", list(info["cmdline"]))
        if described is not None:
            found.append(described)
    return found


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.AccessDenied:
        return True  # exists, owned by someone else
    except psutil.NoSuchProcess:
        return False
