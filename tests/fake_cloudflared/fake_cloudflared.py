"""A stand-in for the `cloudflared` binary, for tests (the real one cannot be downloaded here).

It behaves like cloudflared where Inventiv depends on it:

* `cloudflared tunnel --url http://127.0.0.1:<port>` logs cloudflared's start-up lines on
  stderr (timestamped INF lines, the terms-of-use disclaimer with its https links, the "Your
  quick Tunnel has been created!" box) and then really serves the printed https URL: a TLS
  reverse proxy on loopback forwarding to the --url origin, so a request goes
  client -> TLS -> API -> orchestrator. *.trycloudflare.com cannot resolve to loopback, so the
  box shows https://127.0.0.1:<port> (or https://localhost:<port>).
* `cloudflared tunnel --config FILE run NAME` reads the ingress rules of FILE and applies them
  by path (hostname is ignored: requests arrive on loopback), `http_status:NNN` included.
* It dies on SIGTERM like the real one, and a new start gets a new port, hence a new URL.

Environment:
  FAKE_CLOUDFLARED_CERT    where the self-signed certificate (PEM) goes; the key is written
                           next to it (+ ".key"); reused when present so restarts stay trusted.
  FAKE_CLOUDFLARED_HOST    host shown in the URL: 127.0.0.1 (default) or localhost.
  FAKE_CLOUDFLARED_DELAY_S seconds to wait before printing the URL (cloudflared takes a few).
  FAKE_CLOUDFLARED_SILENT  "1": never print a URL (to test the timeout).
  FAKE_CLOUDFLARED_EVENTS  file that gets one JSON line per start: pid, mode, url, origin.

Tests install it as an executable named `cloudflared` whose shebang is the test interpreter
(see tests/tunnel_helpers.py), first on PATH.
"""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

VERSION = "2025.1.0-fake"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
}


def log(level: str, message: str) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    sys.stderr.write(f"{stamp} {level} {message}\n")
    sys.stderr.flush()


def ascii_box(lines: list[str], padding: int = 2) -> list[str]:
    """Same layout as cloudflared's AsciiBox."""
    width = max(len(line) for line in lines)
    spacer = " " * padding
    border = "+" + "-" * (width + 2 * padding) + "+"
    return [border, *(f"|{spacer}{line.ljust(width)}{spacer}|" for line in lines), border]


# -- certificate ----------------------------------------------------------------------------


def ensure_certificate(cert_path: Path) -> tuple[Path, Path]:
    key_path = cert_path.with_name(cert_path.name + ".key")
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-cloudflared")])
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first, then certificate, each renamed into place: a concurrent start sees both or none.
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    for path, data in ((key_path, key_pem), (cert_path, cert_pem)):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    return cert_path, key_path


# -- ingress --------------------------------------------------------------------------------


class Ingress:
    """Ordered rules: (path regex or None, service). Hostnames are ignored (see module doc)."""

    def __init__(self, rules: list[tuple[re.Pattern[str] | None, str]]) -> None:
        self.rules = rules

    @classmethod
    def single(cls, origin: str) -> Ingress:
        return cls([(None, origin)])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Ingress:
        raw = config.get("ingress") or []
        if not raw:
            raise SystemExit("config has no ingress rules")
        last = raw[-1]
        if last.get("hostname") or last.get("path"):
            log(
                "ERR",
                "The last ingress rule must match all URLs (i.e. it should not have a "
                "hostname or path filter)",
            )
            raise SystemExit(1)
        rules = [
            (re.compile(rule["path"]) if rule.get("path") else None, str(rule["service"]))
            for rule in raw
        ]
        return cls(rules)

    def service_for(self, path: str) -> str:
        only_path = urlsplit(path).path
        for pattern, service in self.rules:
            if pattern is None or pattern.search(only_path):
                return service
        return "http_status:404"


# -- proxy ----------------------------------------------------------------------------------


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cloudflare"
    ingress: Ingress

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _send_status(self, status: int, text: str = "") -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _proxy(self) -> None:
        body = self._read_body()
        service = self.ingress.service_for(self.path)
        if service.startswith("http_status:"):
            self._send_status(int(service.split(":", 1)[1]))
            return
        origin = urlsplit(service)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        client_ip = self.client_address[0]
        headers["X-Forwarded-For"] = client_ip
        headers["X-Forwarded-Proto"] = "https"
        headers["Cf-Connecting-Ip"] = client_ip
        headers["Cf-Ray"] = uuid.uuid4().hex[:16] + "-FAKE"
        conn = http.client.HTTPConnection(origin.hostname, origin.port or 80, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            upstream = conn.getresponse()
        except OSError as exc:
            log(
                "ERR",
                f'error="Unable to reach the origin service. The service may be down or it may '
                f"not be responding to traffic from cloudflared: dial tcp {origin.netloc}: "
                f'{exc}" connIndex=0 originService={service}',
            )
            self._send_status(502, "Bad Gateway: unable to reach the origin service\n")
            return
        try:
            self._relay(upstream)
        finally:
            conn.close()

    def _relay(self, upstream: http.client.HTTPResponse) -> None:
        self.send_response(upstream.status, upstream.reason)
        length = upstream.getheader("Content-Length")
        for key, value in upstream.getheaders():
            if key.lower() in HOP_BY_HOP or key.lower() in ("content-length", "server", "date"):
                continue
            self.send_header(key, value)
        chunked = length is None and self.command != "HEAD" and upstream.status not in (204, 304)
        if length is not None:
            self.send_header("Content-Length", length)
        elif chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            return
        while True:
            data = upstream.read1(65536) if chunked else upstream.read(65536)
            if not data:
                break
            if chunked:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            else:
                self.wfile.write(data)
            self.wfile.flush()
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _proxy


class TLSServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def serve(ingress: Ingress, cert: Path, key: Path) -> tuple[TLSServer, int]:
    handler = type("Handler", (ProxyHandler,), {"ingress": ingress})
    server = TLSServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server, server.server_address[1]


# -- commands -------------------------------------------------------------------------------


def option(args: list[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == f"--{name}" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def record(event: dict[str, Any]) -> None:
    path = os.environ.get("FAKE_CLOUDFLARED_EVENTS")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")


def preamble(settings: str) -> None:
    log("INF", f"Version {VERSION} (Checksum {uuid.uuid4().hex}{uuid.uuid4().hex})")
    log("INF", "GOOS: linux, GOVersion: go1.22.5, GoArch: amd64")
    log("INF", f"Settings: map[{settings}]")
    log("INF", f"Generated Connector ID: {uuid.uuid4()}")
    log("INF", "Initial protocol quic")


def registered() -> None:
    log(
        "INF",
        f"Registered tunnel connection connIndex=0 connection={uuid.uuid4()} event=0 "
        "ip=127.0.0.1 location=lo01 protocol=quic",
    )


def certificate() -> tuple[Path, Path]:
    path = os.environ.get("FAKE_CLOUDFLARED_CERT") or os.path.join(
        tempfile.gettempdir(), f"fake-cloudflared-{os.getuid()}.pem"
    )
    return ensure_certificate(Path(path))


def quick(origin: str) -> TLSServer:
    log(
        "INF",
        "Thank you for trying Cloudflare Tunnel. Quick tunnels are for experiments: no uptime "
        "guarantee, see the terms at https://www.cloudflare.com/website-terms/ and use a named "
        "tunnel in production: https://developers.cloudflare.com/cloudflare-one/connections/"
        "connect-apps",
    )
    log("INF", "Requesting new quick Tunnel on trycloudflare.com...")
    cert, key = certificate()
    server, port = serve(Ingress.single(origin), cert, key)
    host = os.environ.get("FAKE_CLOUDFLARED_HOST", "127.0.0.1")
    url = f"https://{host}:{port}"
    delay = float(os.environ.get("FAKE_CLOUDFLARED_DELAY_S") or 0)
    if delay:
        time.sleep(delay)
    if os.environ.get("FAKE_CLOUDFLARED_SILENT") == "1":
        log("INF", "Still waiting for the quick tunnel service...")
    else:
        box = [
            "Your quick Tunnel has been created! Visit it at "
            "(it may take some time to be reachable):",
            url,
        ]
        for line in ascii_box(box):
            log("INF", line)
    log(
        "INF",
        "Cannot determine default configuration path. No file [config.yml config.yaml] in "
        "[~/.cloudflared ~/.cloudflare-warp ~/cloudflare-warp /etc/cloudflared "
        "/usr/local/etc/cloudflared]",
    )
    preamble(f"ha-connections:1 protocol:quic url:{origin}")
    registered()
    record({"event": "ready", "pid": os.getpid(), "mode": "quick", "url": url, "origin": origin})
    return server


def named(config_file: str, name: str) -> TLSServer:
    import yaml

    config = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
    creds = config.get("credentials-file")
    if creds and not Path(creds).is_file():
        log("ERR", f"Tunnel credentials file '{creds}' doesn't exist or is not a file")
        raise SystemExit(1)
    log("INF", f"Starting tunnel tunnelID={uuid.uuid4()}")
    cert, key = certificate()
    server, port = serve(Ingress.from_config(config), cert, key)
    preamble(f"config:{config_file}")
    registered()
    url = f"https://{os.environ.get('FAKE_CLOUDFLARED_HOST', '127.0.0.1')}:{port}"
    record({"event": "ready", "pid": os.getpid(), "mode": "named", "name": name, "url": url})
    return server


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("--version", "-v", "version"):
        print(f"cloudflared version {VERSION} (built {dt.date.today()})")
        return 0
    if argv[0] != "tunnel":
        print(f"fake cloudflared: unsupported command {argv!r}", file=sys.stderr)
        return 2
    args = argv[1:]
    if args[:1] == ["list"]:
        print("[]")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    origin = option(args, "url")
    config = option(args, "config")
    if origin is not None:
        server = quick(origin if "://" in origin else f"http://{origin}")
    elif config is not None and "run" in args:
        server = named(config, args[-1])
    else:
        print(f"fake cloudflared: unsupported tunnel arguments {args!r}", file=sys.stderr)
        return 2
    try:
        server.serve_forever(poll_interval=0.2)
    except (KeyboardInterrupt, SystemExit):
        log("INF", "Initiating graceful shutdown due to signal terminated ...")
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main(sys.argv[1:]))
