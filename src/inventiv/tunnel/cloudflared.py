"""Everything Inventiv knows about the cloudflared binary: where it is, how to call it, what it
prints.

cloudflared has no machine-readable way to hand over a quick tunnel's URL on stdout; it logs an
ASCII box on stderr (see `AsciiBox` in cloudflared's cmd/cloudflared/tunnel/quick_tunnel.go):

    2021-09-03T10:44:41Z INF +--------------------------------------------------------+
    2021-09-03T10:44:41Z INF |  Your quick Tunnel has been created! Visit it at (...):  |
    2021-09-03T10:44:41Z INF |  https://symantec-transferred-lock-revenues.trycloudflare.com  |
    2021-09-03T10:44:41Z INF +--------------------------------------------------------+

The lines before it carry other https URLs (the terms of use, the docs), so the parser reads
the URL from the box rather than taking the first https:// it sees.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from urllib.parse import urlsplit

from inventiv.config import is_loopback_host, validate_control_plane_url

BINARY_NAME = "cloudflared"
BOX_MARKER = "Your quick Tunnel has been created"
QUICK_TUNNEL_DOMAIN = "trycloudflare.com"
# Hosts under trycloudflare.com that are Cloudflare's own service, never a tunnel.
_SERVICE_HOSTS = frozenset({"api.trycloudflare.com", "trycloudflare.com", "www.trycloudflare.com"})
_URL_RE = re.compile(r"https://[A-Za-z0-9.\-\[\]:]+(?=[\s|\"'<>]|$)")
_BOX_LINES_AFTER_MARKER = 3

INSTALL_HINT = """cloudflared is not installed (or not on PATH). Install it with one of:
  Debian/Ubuntu (Cloudflare's package repository):
    sudo mkdir -p --mode=0755 /usr/share/keyrings
    curl -fsSL https://pkg.cloudflare.com/cloudflare-main.gpg \\
      | sudo tee /usr/share/keyrings/cloudflare-main.gpg >/dev/null
    echo "deb [signed-by=/usr/share/keyrings/cloudflare-main.gpg] \\
      https://pkg.cloudflare.com/cloudflared any main" \\
      | sudo tee /etc/apt/sources.list.d/cloudflared.list
    sudo apt-get update && sudo apt-get install cloudflared
  macOS (Homebrew):
    brew install cloudflared
  Any Linux, release binary:
    curl -fsSL -o cloudflared \\
      https://github.com/cloudflare/cloudflared/releases/latest/download/cloudflared-linux-amd64
    chmod +x cloudflared && sudo mv cloudflared /usr/local/bin/
Then run the command again."""


class CloudflaredNotFound(RuntimeError):
    """Raised when no cloudflared executable is on PATH; its message says how to install one."""

    def __init__(self) -> None:
        super().__init__(INSTALL_HINT)


def find_cloudflared() -> str:
    """Return the cloudflared executable PATH resolves to, or raise with install instructions.

    PATH lookup (not a fixed location) is deliberate: it is what the operator's shell runs, and
    it lets the tests put a stand-in first.
    """
    path = shutil.which(BINARY_NAME)
    if path is None:
        raise CloudflaredNotFound()
    return path


def origin_url(port: int) -> str:
    """The origin cloudflared forwards to; loopback only, the API never listens publicly."""
    return f"http://127.0.0.1:{port}"


def quick_tunnel_command(binary: str, port: int) -> list[str]:
    """The seed's exact command: `cloudflared tunnel --url http://127.0.0.1:<api port>`."""
    return [binary, "tunnel", "--url", origin_url(port)]


def quick_tunnel_command_text(port: int) -> str:
    """The same command as an operator would type it."""
    return " ".join(quick_tunnel_command(BINARY_NAME, port))


def named_tunnel_command(binary: str, config_path: str, name: str) -> list[str]:
    return [binary, "tunnel", "--config", config_path, "run", name]


def is_tunnel_url(url: str) -> bool:
    """True for a URL a quick tunnel can hand out: a trycloudflare.com host, or a loopback https
    host (what the test stand-in serves, since *.trycloudflare.com cannot resolve to loopback)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme != "https" or not host:
        return False
    if host.endswith("." + QUICK_TUNNEL_DOMAIN):
        return host not in _SERVICE_HOSTS
    return is_loopback_host(host)


def _urls_in(line: str) -> list[str]:
    return [m.group(0).rstrip(".,;") for m in _URL_RE.finditer(line)]


class QuickTunnelURLParser:
    """Feed cloudflared's output line by line; `feed` returns the tunnel URL once it appears.

    Primary source: the first URL inside the box that follows the "Your quick Tunnel has been
    created!" line. Fallback, for builds that print it differently: a bare tunnel host on an
    INF line. URLs that cannot be a tunnel (terms of use, docs, api.trycloudflare.com in an
    error) are never returned.
    """

    def __init__(self) -> None:
        self._lines_since_marker: int | None = None
        self.url: str | None = None

    def feed(self, line: str) -> str | None:
        if self.url is not None:
            return None
        if BOX_MARKER in line:
            self._lines_since_marker = 0
            return None
        in_box = self._lines_since_marker is not None
        if in_box:
            assert self._lines_since_marker is not None
            self._lines_since_marker += 1
            if self._lines_since_marker > _BOX_LINES_AFTER_MARKER:
                self._lines_since_marker = None
        for candidate in _urls_in(line):
            if not is_tunnel_url(candidate):
                continue
            host = (urlsplit(candidate).hostname or "").lower()
            if in_box or host.endswith("." + QUICK_TUNNEL_DOMAIN):
                try:
                    self.url = validate_control_plane_url(candidate)
                except ValueError:
                    continue
                return self.url
        return None


def extract_quick_tunnel_url(lines: Iterable[str]) -> str | None:
    """The tunnel URL in a block of cloudflared output, or None."""
    parser = QuickTunnelURLParser()
    for line in lines:
        url = parser.feed(line)
        if url is not None:
            return url
    return None
