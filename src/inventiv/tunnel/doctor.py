"""`inventiv doctor`: the troubleshooting guide, automated, one link of the chain at a time.

    worker --https--> public URL --cloudflared--> 127.0.0.1:<api port> --> API --> orchestrator

Each check prints pass/fail and, on failure, the exact command or value that fixes it. A check
whose prerequisite failed is skipped with the reason, so the first failure is the one to fix.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from inventiv.config import (
    ControlPlaneURLError,
    Settings,
    is_loopback_host,
    validate_control_plane_url,
)
from inventiv.protocol import PING_PATH
from inventiv.tunnel.announce import CONTROL_PLANE_URL_PATH
from inventiv.tunnel.cloudflared import BINARY_NAME, quick_tunnel_command_text
from inventiv.tunnel.expose import other_program_message
from inventiv.tunnel.probe import Probe, probe
from inventiv.tunnel.procs import CloudflaredProc, find_cloudflared, pid_alive
from inventiv.tunnel.publish import read_state
from inventiv.tunnel.stacksettings import URL_KEY, ConfiguredURL

PASS, FAIL, SKIP = "pass", "fail", "skip"
# Cloudflare edge answers for a tunnel that exists but cannot reach its origin / is not connected.
_EDGE_ORIGIN_ERRORS = frozenset({502, 503, 504, 521, 522, 523, 524, 530})


@dataclass
class Check:
    id: str
    title: str
    status: str = PASS
    detail: str = ""
    fix: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == FAIL


@dataclass
class DoctorReport:
    api_port: int
    port_offset: int
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(check.failed for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "api_port": self.api_port,
            "port_offset": self.port_offset,
            "checks": [asdict(check) for check in self.checks],
        }


class Doctor:
    def __init__(
        self,
        settings: Settings,
        configured: ConfiguredURL,
        *,
        timeout: float = 5.0,
        processes: Callable[[], list[CloudflaredProc]] = find_cloudflared,
    ) -> None:
        self.settings = settings
        self.configured = configured
        self.timeout = timeout
        self._processes = processes
        self.report = DoctorReport(settings.api_port, settings.port_offset)
        self._by_id: dict[str, Check] = {}
        self.url: str | None = None
        self.local: Probe | None = None

    # -- plumbing ----------------------------------------------------------------------------

    def _add(self, check: Check) -> Check:
        self.report.checks.append(check)
        self._by_id[check.id] = check
        return check

    def _blocked(self, check_id: str, title: str, *depends_on: str) -> bool:
        """Record a skip if a prerequisite did not pass; True when skipped."""
        for dep in depends_on:
            prior = self._by_id.get(dep)
            if prior is not None and prior.status != PASS:
                self._add(Check(check_id, title, SKIP, f"skipped: '{prior.title}' did not pass"))
                return True
        return False

    @property
    def _offset_prefix(self) -> str:
        offset = self.settings.port_offset
        return f"PORT_OFFSET={offset} " if offset else ""

    @property
    def _port_rule(self) -> str:
        if self.settings.api_host_port:
            return f"API_HOST_PORT={self.settings.api_host_port}"
        return f"8003 + PORT_OFFSET={self.settings.port_offset}"

    @property
    def _make_tunnel(self) -> str:
        return f"`{self._offset_prefix}make tunnel` (or `{self._offset_prefix}inventiv tunnel`)"

    # -- checks ------------------------------------------------------------------------------

    def run(self) -> DoctorReport:
        procs = self._processes()
        self.check_cloudflared_running(procs)
        self.check_cloudflared_port(procs)
        self.check_api()
        self.check_orchestrator()
        self.check_url_valid()
        self.check_url_current()
        self.check_control_plane_url()
        self.check_public_root()
        self.check_worker_path()
        return self.report

    def check_cloudflared_running(self, procs: list[CloudflaredProc]) -> None:
        title = "cloudflared is running"
        if procs:
            pids = ", ".join(str(p.pid) for p in procs)
            self._add(Check("cloudflared_running", title, PASS, f"pid {pids}"))
            return
        port = self.settings.api_port
        if shutil.which(BINARY_NAME) is None:
            fix = (
                "Install cloudflared (`brew install cloudflared`, the cloudflared package from "
                "pkg.cloudflare.com, or the release binary), then run " + self._make_tunnel + "."
            )
            detail = "cloudflared is not installed and no tunnel process runs."
        else:
            fix = (
                f"Start the tunnel and keep it running: {self._make_tunnel}, which runs "
                f"`{quick_tunnel_command_text(port)}`, writes the URL to "
                f"{self.configured.env_file} and tells the control plane."
            )
            detail = "no cloudflared process found (the tunnel is down)."
        self._add(Check("cloudflared_running", title, FAIL, detail, fix))

    def check_cloudflared_port(self, procs: list[CloudflaredProc]) -> None:
        port = self.settings.api_port
        title = f"cloudflared forwards to the API port {port}"
        if self._blocked("cloudflared_port", title, "cloudflared_running"):
            return
        matching = [p for p in procs if port in p.ports]
        if matching:
            proc = matching[0]
            self._add(Check("cloudflared_port", title, PASS, f"pid {proc.pid}: {proc.command}"))
            return
        seen = "; ".join(
            f"pid {p.pid} -> {', '.join(f'127.0.0.1:{x}' for x in p.ports) or 'unknown port'}"
            for p in procs
        )
        self._add(
            Check(
                "cloudflared_port",
                title,
                FAIL,
                f"cloudflared forwards to the wrong port ({seen}); this stack's API listens on "
                f"127.0.0.1:{port} ({self._port_rule}).",
                f"Stop that cloudflared and restart it on the API port: {self._make_tunnel}, i.e. "
                f"`{quick_tunnel_command_text(port)}`. If that tunnel belongs to another stack, "
                "run the doctor with that stack's PORT_OFFSET.",
            )
        )

    def check_api(self) -> None:
        url = self.settings.api_local_url
        title = f"API answers on {url}"
        found = probe(url + "/", local=True, timeout=self.timeout)
        self.local = found
        if found.is_inventiv_api:
            version = found.json_dict.get("version", "?")
            self._add(Check("api_local", title, PASS, f"inventiv-api {version}"))
            return
        if found.outcome == "refused":
            detail = f"Connection refused on {url}: the API is not started (or on another port)."
            fix = (
                f"Start it: `{self._offset_prefix}make api-expose` (or `{self._offset_prefix}make "
                f"up`); it listens on 127.0.0.1:{self.settings.api_port} ({self._port_rule})."
            )
        elif found.answered and found.status is not None and found.status >= 500:
            detail = f"The API answers {found.describe()}."
            fix = f"Read the API logs in {self.settings.data_dir} and restart with `make up`."
        elif found.answered:
            detail = other_program_message(self.settings, found)
            fix = (
                "Stop the other program or change PORT_OFFSET / API_HOST_PORT, then "
                "`make api-expose`."
            )
        else:
            detail = f"{url} did not answer ({found.describe()})."
            fix = f"Restart the API: `{self._offset_prefix}make api-expose`."
        self._add(Check("api_local", title, FAIL, detail, fix))

    def check_orchestrator(self) -> None:
        title = "orchestrator reachable from the API"
        if self._blocked("orchestrator", title, "api_local"):
            return
        assert self.local is not None
        state = self.local.json_dict.get("orchestrator")
        if state == "ok":
            self._add(Check("orchestrator", title, PASS, self.settings.orchestrator_url))
            return
        self._add(
            Check(
                "orchestrator",
                title,
                FAIL,
                f"The API reports the orchestrator as {state!r} (expected on "
                f"{self.settings.orchestrator_url} = 8001 + PORT_OFFSET).",
                f"Start the whole stack with the same PORT_OFFSET: `{self._offset_prefix}make up` "
                "(API and orchestrator together).",
            )
        )

    def check_url_valid(self) -> None:
        title = f"{URL_KEY} is valid"
        raw, source = self.configured.value, self.configured.source
        if raw is None:
            self._add(
                Check(
                    "url_valid",
                    title,
                    FAIL,
                    f"{URL_KEY} is not set (looked in the environment and {source}).",
                    f"Run {self._make_tunnel}: it writes {URL_KEY} to {self.configured.env_file}. "
                    f"Or set {URL_KEY}=https://<your tunnel host> there yourself.",
                )
            )
            return
        try:
            self.url = validate_control_plane_url(raw)
        except ControlPlaneURLError as exc:
            fix = (
                f"In {source}, write: {URL_KEY}={exc.suggestion}"
                if exc.suggestion
                else f"In {source}, set {URL_KEY} to https://<host> with nothing after the host."
            )
            self._add(Check("url_valid", title, FAIL, f"{raw!r} (from {source}): {exc}", fix))
            return
        host = raw.split("://", 1)[-1].split(":")[0].strip("[]")
        note = (
            " (loopback: only workers on this machine can use it)" if is_loopback_host(host) else ""
        )
        self._add(Check("url_valid", title, PASS, f"{self.url} (from {source}){note}"))

    def check_url_current(self) -> None:
        title = f"{URL_KEY} is the running tunnel's URL"
        if self._blocked("url_current", title, "url_valid"):
            return
        state = read_state(self.settings)
        if (
            state is None
            or not pid_alive(state.supervisor_pid)
            or not pid_alive(state.cloudflared_pid)
        ):
            self._add(
                Check(
                    "url_current",
                    title,
                    SKIP,
                    "skipped: no `inventiv tunnel` running for this stack",
                )
            )
            return
        if state.url == self.url:
            self._add(
                Check("url_current", title, PASS, f"inventiv tunnel pid {state.supervisor_pid}")
            )
            return
        self._add(
            Check(
                "url_current",
                title,
                FAIL,
                f"`inventiv tunnel` (pid {state.supervisor_pid}) serves {state.url}, but "
                f"{URL_KEY} from {self.configured.source} is {self.url}.",
                f"Use the tunnel's URL: {URL_KEY}={state.url} (if the environment variable "
                f"overrides {self.configured.env_file}, unset it: `unset {URL_KEY}`).",
            )
        )

    def check_control_plane_url(self) -> None:
        title = "the control plane gives workers this URL"
        if self._blocked("control_plane_url", title, "url_valid", "orchestrator"):
            return
        endpoint = self.settings.api_local_url + CONTROL_PLANE_URL_PATH
        token, _ = self.settings.resolve_admin_token()
        try:
            response = httpx.get(
                endpoint,
                headers={"Authorization": f"Bearer {token}"},
                timeout=self.timeout,
                trust_env=False,
            )
            current = response.json().get("url") if response.is_success else None
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            self._add(Check("control_plane_url", title, FAIL, f"{endpoint}: {exc}", None))
            return
        if not response.is_success:
            self._add(
                Check(
                    "control_plane_url",
                    title,
                    FAIL,
                    f"GET {endpoint} -> HTTP {response.status_code}",
                    "Run the doctor with the admin token the API uses (INVENTIV_ADMIN_TOKEN, or "
                    "the same PORT_OFFSET / INVENTIV_DATA_DIR).",
                )
            )
            return
        if current == self.url:
            self._add(Check("control_plane_url", title, PASS, str(current)))
            return
        self._add(
            Check(
                "control_plane_url",
                title,
                FAIL,
                f"The running control plane hands workers {current!r}, not {self.url}.",
                f"Tell it without a restart: `{self._offset_prefix}inventiv tunnel --set-url "
                f"{self.url}` (`make tunnel` does this by itself on every new URL).",
            )
        )

    def check_public_root(self) -> None:
        title = "public URL answers GET /"
        if self._blocked("public_root", title, "url_valid", "api_local"):
            return
        assert self.url is not None
        found = probe(self.url + "/", local=False, timeout=self.timeout)
        if found.is_inventiv_api:
            self._add(Check("public_root", title, PASS, f"{self.url}/ -> inventiv-api"))
            return
        if found.answered and found.status == 404:
            self._add(
                Check(
                    "public_root",
                    title,
                    PASS,
                    f"{self.url}/ -> HTTP 404: the root is not published (named tunnel "
                    "ingress publishes worker paths only); the worker path check decides.",
                )
            )
            return
        self._add(Check("public_root", title, FAIL, *self._public_failure(found)))

    def _public_failure(self, found: Probe) -> tuple[str, str]:
        url = self.url
        if found.outcome == "dns":
            return (
                f"{url} does not resolve: a quick tunnel's URL disappears when its cloudflared "
                "stops, and every restart gets a new one.",
                f"Run {self._make_tunnel}: it starts cloudflared, writes the new URL to "
                f"{self.configured.env_file} and pushes it to the control plane and workers. "
                "For a URL that never changes, use a named tunnel (--named NAME --hostname HOST).",
            )
        if found.outcome in ("refused", "timeout", "error"):
            return (
                f"Nothing answers at {url} ({found.describe()}): the tunnel is down.",
                f"Restart the tunnel: {self._make_tunnel}; keep it running.",
            )
        if found.outcome == "tls":
            return (
                f"TLS failed for {url}: {found.error}",
                "Cloudflare URLs always carry a valid certificate: check the host in "
                f"{URL_KEY}, or set SSL_CERT_FILE if a proxy re-signs TLS on this network.",
            )
        if found.status in _EDGE_ORIGIN_ERRORS:
            return (
                f"{url}/ -> {found.describe()}: the tunnel exists but cannot reach the API on "
                f"127.0.0.1:{self.settings.api_port} (cloudflared down or on the wrong port).",
                f"Restart the tunnel on the API port: {self._make_tunnel}.",
            )
        return (
            f"{url}/ answered {found.describe()}, not the Inventiv API: {URL_KEY} points "
            "somewhere else.",
            f"Run {self._make_tunnel} so {URL_KEY} is the tunnel to this stack.",
        )

    def check_worker_path(self) -> None:
        title = "worker path end to end (GET <url>/internal/worker/ping)"
        if self._blocked("worker_path", title, "public_root", "orchestrator"):
            return
        assert self.url is not None
        target = self.url + PING_PATH
        found = probe(target, local=False, timeout=self.timeout)
        if found.answered and found.status == 200 and found.json_dict.get("ok") is True:
            self._add(Check("worker_path", title, PASS, f"{target} -> 200 ok"))
            return
        if found.answered and found.status == 404:
            detail = f"{target} -> HTTP 404: the worker path is not published."
            fix = (
                "If this is a named tunnel, its ingress must publish ^/internal/worker/: "
                "regenerate it with `inventiv tunnel --named NAME --hostname HOST`."
            )
        elif found.answered and found.status in _EDGE_ORIGIN_ERRORS:
            detail = f"{target} -> {found.describe()}: {found.json_dict.get('message', '')}".rstrip(
                ": "
            )
            fix = (
                f"Check the orchestrator and the tunnel: `{self._offset_prefix}make up`, then "
                f"{self._make_tunnel}."
            )
        else:
            detail = f"{target} -> {found.describe()}"
            fix = f"Restart the tunnel: {self._make_tunnel}."
        self._add(Check("worker_path", title, FAIL, detail, fix))


def run_doctor(
    settings: Settings, configured: ConfiguredURL, *, timeout: float = 5.0
) -> DoctorReport:
    return Doctor(settings, configured, timeout=timeout).run()
