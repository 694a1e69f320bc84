"""The agent itself: register, heartbeat at the pace the control plane sets, follow its
instructions, and stop everything cleanly when told to, when the instance is gone, or when the
control plane has been unreachable for too long (dead-man switch)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import random
import signal
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from inventiv import __version__
from inventiv.config import ControlPlaneURLError
from inventiv.protocol import (
    DesiredState,
    HeartbeatRequest,
    HeartbeatResponse,
    HostFacts,
    RegisterRequest,
    WorkerStatus,
    hash_token,
)

from .backoff import Backoff, jittered
from .client import CallFailed, ControlPlaneClient, FailureKind, build_http_client
from .config import AgentConfig, ConfigError
from .engine import EnginePhase, EngineSupervisor, build_engine_spec, free_port
from .health import HealthApp, HealthServer
from .identity import Credentials, TokenKind
from .metrics import GpuProbe, SystemProbe, host_facts, scrape_engine_queue
from .state import AgentState
from .urls import ControlPlaneUrl, describe_url_error

log = logging.getLogger("inventiv.agent")

EXIT_OK = 0  # stopped on purpose: signal, terminate, instance gone or revoked
EXIT_ERROR = 1  # unexpected failure inside the agent
EXIT_CONFIG = 2  # a setting is wrong; the message says which
EXIT_AUTH = 3  # every token we have was refused
EXIT_ORPHAN = 4  # dead-man switch: control plane unreachable for WORKER_ORPHAN_SHUTDOWN_S

DEFAULT_HEARTBEAT_INTERVAL_S = 3.0
# Bounds on the interval the control plane dictates: a 0 must not become a busy loop.
MIN_HEARTBEAT_INTERVAL_S = 0.05
MAX_HEARTBEAT_INTERVAL_S = 300.0
SHUTDOWN_COMMAND_TIMEOUT_S = 60.0


class AgentExit(Exception):
    """Raised inside the control loop to end the agent with an exit code and one log line."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _bounded(interval_s: float) -> float:
    return min(MAX_HEARTBEAT_INTERVAL_S, max(MIN_HEARTBEAT_INTERVAL_S, interval_s))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class Agent:
    """One worker agent. `prepare()` checks settings and binds ports (fast, synchronous, so
    configuration errors surface before anything starts); `run()` does the work."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        install_signal_handlers: bool = True,
    ) -> None:
        self.config = config
        self.state = AgentState()
        self.urls = ControlPlaneUrl(config.control_plane_url, config.control_plane_url_file)
        self.creds = Credentials(
            config.state_dir,
            bootstrap_token=config.bootstrap_token,
            bootstrap_token_file=config.bootstrap_token_file,
            worker_id=config.worker_id,
        )
        self._transport = transport
        self._rng = rng or random.Random()
        self._install_signal_handlers = install_signal_handlers
        self._backoff = Backoff(config.retry_base_s, config.retry_cap_s, rng=self._rng)
        self._interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self._seq = 0
        self._token: str | None = None
        self._token_kind: TokenKind | None = None
        self._last_rejection: str | None = None
        self._unreachable_wall: float | None = None
        self._orphaned = False
        self._stop_signal: str | None = None
        self._stop = asyncio.Event()
        self._status_changed = asyncio.Event()
        self._url_changed = asyncio.Event()
        self._prepared = False
        self._shutting_down = False
        self.engine: EngineSupervisor
        self.health: HealthServer
        self.http: httpx.AsyncClient
        self.client: ControlPlaneClient
        self.gpu: GpuProbe
        self.system: SystemProbe
        self._host: HostFacts

    # ----------------------------------------------------------------- setup / teardown

    def prepare(self) -> None:
        """Validate settings, load identity and bind the health port; raises ConfigError."""
        config = self.config.check()
        self.state.control_plane_url = self.urls.load()
        self.creds.load()
        app = HealthApp(self.state, token_hash=self._token_hash, adopt_url=self._adopt_pushed_url)
        self.health = HealthServer(app, config.health_host, config.health_port)
        try:
            self.health.bind()
        except OSError as exc:
            raise ConfigError(
                f"WORKER_HEALTH_PORT: cannot listen on {config.health_host}:"
                f"{config.health_port}: {exc.strerror or exc}."
            ) from None
        port = config.engine_port or free_port()
        self.http = build_http_client(config.http_timeout_s, config.ca_bundle, self._transport)
        self.client = ControlPlaneClient(self.http)
        self.engine = EngineSupervisor(
            build_engine_spec(config, port),
            # The engine is local: a separate client keeps probes off the control-plane pool.
            httpx.AsyncClient(trust_env=False),
            state_dir=config.state_dir,
            restart_base_s=config.engine_restart_base_s,
            restart_cap_s=config.engine_restart_cap_s,
            crash_limit=config.engine_crash_limit,
            stop_timeout_s=config.engine_stop_timeout_s,
            probe_interval_s=config.ready_probe_interval_s,
            on_change=self._engine_changed,
        )
        self.gpu = GpuProbe(simulate=config.simulate_gpu)
        self.system = SystemProbe()
        self._host = host_facts()
        self._prepared = True

    @property
    def health_port(self) -> int:
        return self.health.port

    @property
    def engine_port(self) -> int:
        return self.engine.spec.port

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask run() to stop the engine and return; a second request (an impatient second
        Ctrl-C) kills the engine at once instead of waiting for its graceful exit."""
        if self._stop.is_set() and self._prepared:
            log.warning("%s again: killing the engine now", reason)
            self.engine.kill_now()
            return
        if self._stop_signal is None:
            self._stop_signal = reason
        self._stop.set()

    async def run(self) -> int:
        """Run until stopped; returns the process exit code (see EXIT_*)."""
        if not self._prepared:
            self.prepare()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        if self._install_signal_handlers:
            for sig in signals:
                loop.add_signal_handler(sig, self.request_stop, f"received {sig.name}")
        atexit.register(self.engine.kill_now)
        engine = self.config.engine.value
        if self.engine.spec.argv is not None:
            engine += f" on port {self.engine_port}"
        log.info(
            "inventiv worker %s starting: instance %s, worker %s, control plane %s, engine %s, "
            "health on %s:%d",
            __version__,
            self.config.instance_id,
            self.creds.worker_id,
            self.urls.current,
            engine,
            self.config.health_host,
            self.health_port,
        )
        health_task = asyncio.create_task(self.health.serve(), name="health")
        engine_task = asyncio.create_task(self.engine.run(), name="engine")
        control_task = asyncio.create_task(self._control_loop(), name="control")
        stop_task = asyncio.create_task(self._stop.wait(), name="stop")
        code = EXIT_OK
        try:
            done, _ = await asyncio.wait(
                {control_task, stop_task, health_task, engine_task},
                return_when=asyncio.FIRST_COMPLETED,
            )
            code = self._outcome(done, stop_task)
        finally:
            for task in (control_task, stop_task):
                task.cancel()
            await self._shutdown(engine_task, health_task)
            if self._install_signal_handlers:
                for sig in signals:
                    loop.remove_signal_handler(sig)
            atexit.unregister(self.engine.kill_now)
        return code

    def _outcome(self, done: set[asyncio.Task[Any]], stop: asyncio.Task[Any]) -> int:
        if stop in done:
            log.info("%s: stopping the engine and exiting", self._stop_signal)
            return EXIT_OK
        for task in done:
            exc = task.exception()
            if isinstance(exc, AgentExit):
                (log.info if exc.code == EXIT_OK else log.error)("exiting: %s", exc.reason)
                return exc.code
            if exc is not None:
                log.error("exiting: %s task failed", task.get_name(), exc_info=exc)
                return EXIT_ERROR
        log.error("exiting: %s task ended unexpectedly", next(iter(done)).get_name())
        return EXIT_ERROR

    async def _shutdown(
        self, engine_task: asyncio.Task[None], health_task: asyncio.Task[None]
    ) -> None:
        self._shutting_down = True  # the engine stopping now is not a status change to report
        await self.engine.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(engine_task, 5.0)
        if self._orphaned and self.config.shutdown_command:
            await self._run_shutdown_command(self.config.shutdown_command)
        self.health.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(health_task, 5.0)
        await self.engine.http.aclose()
        await self.http.aclose()
        self.gpu.close()

    @staticmethod
    async def _run_shutdown_command(command: str) -> None:
        log.warning("running WORKER_SHUTDOWN_COMMAND: %s", command)
        try:
            proc = await asyncio.create_subprocess_shell(command)
            code = await asyncio.wait_for(proc.wait(), SHUTDOWN_COMMAND_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            log.error("WORKER_SHUTDOWN_COMMAND failed: %s", exc or "timed out")
            return
        if code != 0:
            log.error("WORKER_SHUTDOWN_COMMAND exited with code %d", code)

    # ----------------------------------------------------------------- control loop

    async def _control_loop(self) -> None:
        while True:
            await self._register()
            await self._heartbeat_until_unauthorized()

    async def _register(self) -> None:
        self._backoff.reset()
        while True:
            picked = self.creds.pick()
            if picked is None:
                raise AgentExit(
                    EXIT_AUTH,
                    "the control plane refused every token this worker has (the stored worker "
                    "token and the bootstrap token, if any): give the instance a new bootstrap "
                    "token (INVENTIV_BOOTSTRAP_TOKEN) or recreate it",
                )
            token, kind = picked
            body = RegisterRequest(
                instance_id=self.config.instance_id,
                worker_id=self.creds.worker_id,
                agent_version=__version__,
                model_id=self.config.model_id,
                engine_port=self.engine_port
                if self.engine.spec.argv or self.config.model_id
                else None,
                health_port=self.health_port or None,
                address=self.config.advertise_address,
                gpus=await asyncio.to_thread(self.gpu.inventory),
                host=self._host,
                simulated=self.config.simulate_gpu,
            )
            try:
                response = await self.client.register(self.urls.current, token, body)
            except CallFailed as failure:
                self.state.register_failures += 1
                if failure.kind is FailureKind.UNAUTHORIZED:
                    self._unauthorized(failure, token, kind)
                    continue
                await self._after_failure(failure, "register")
                continue
            self._reachable()
            if response.worker_token:
                self.creds.store_worker_token(response.worker_token)
                token, kind = response.worker_token, TokenKind.WORKER
            self._token, self._token_kind = token, kind
            self._interval_s = _bounded(response.heartbeat_interval_s)
            self.state.registered = True
            self.state.registrations += 1
            log.info(
                "registered with %s using the %s%s (control plane status %s, heartbeat every %gs)",
                self.urls.current,
                picked[1].value,
                "; worker token stored" if response.worker_token else "",
                response.status,
                response.heartbeat_interval_s,
            )
            return

    async def _heartbeat_until_unauthorized(self) -> None:
        self._backoff.reset()
        assert self._token is not None and self._token_kind is not None
        while True:
            body = await self._heartbeat_body()
            try:
                response = await self.client.heartbeat(self.urls.current, self._token, body)
            except CallFailed as failure:
                self.state.heartbeat_failures += 1
                if failure.kind is FailureKind.UNAUTHORIZED:
                    self.state.registered = False
                    self._unauthorized(failure, self._token, self._token_kind)
                    return
                await self._after_failure(failure, "heartbeat")
                continue
            self._heartbeat_ok(response)
            await self._pause(jittered(self._interval_s, 0.1, self._rng), steady=True)

    def _heartbeat_ok(self, response: HeartbeatResponse) -> None:
        self._reachable()
        self._backoff.reset()
        self.state.heartbeats_ok += 1
        self.state.last_heartbeat_ok_at = time.monotonic()
        interval = _bounded(response.heartbeat_interval_s)
        if interval != self._interval_s:
            log.info("heartbeat interval now %gs", interval)
            self._interval_s = interval
        if response.control_plane_url and response.control_plane_url != self.urls.current:
            try:
                self._adopt_url(response.control_plane_url, "heartbeat response")
            except ControlPlaneURLError as exc:
                log.error("ignoring control_plane_url from heartbeat: %s", describe_url_error(exc))
        desired = response.desired_state
        if desired is not self.state.desired_state:
            log.info(
                "control plane asks: %s (was %s)", desired.value, self.state.desired_state.value
            )
            self.state.desired_state = desired
            self._refresh_status()
        if desired is DesiredState.TERMINATE:
            raise AgentExit(EXIT_OK, "the control plane asked to terminate")

    async def _heartbeat_body(self) -> HeartbeatRequest:
        queue = running = None
        if self.engine.ready:
            queue, running = await scrape_engine_queue(
                self.engine.http, self.engine.spec.base_url, self.engine.spec.api_key
            )
        self.state.queue_depth, self.state.requests_running = queue, running
        gpus = await asyncio.to_thread(self.gpu.stats, (running or 0) + (queue or 0))
        system = await asyncio.to_thread(self.system.stats)
        self._seq += 1
        status = self.state.status
        return HeartbeatRequest(
            instance_id=self.config.instance_id,
            worker_id=self.creds.worker_id,
            seq=self._seq,
            status=status,
            model_id=self.config.model_id,
            queue_depth=queue,
            requests_running=running,
            gpus=gpus,
            system=system,
            simulated=self.config.simulate_gpu,
            error=self.engine.error if status is WorkerStatus.ERROR else None,
        )

    # ----------------------------------------------------------------- failures

    def _unauthorized(self, failure: CallFailed, token: str, kind: TokenKind) -> None:
        """401: exit if the token was revoked (instance terminated), else try the next token."""
        self._reachable()
        if failure.code == "token_revoked":
            raise AgentExit(
                EXIT_OK,
                f"the control plane revoked this worker's token (instance terminated): {failure}",
            )
        self.creds.refuse(token)
        log.warning("the control plane refused the %s (%s); registering again", kind.value, failure)

    async def _after_failure(self, failure: CallFailed, what: str) -> None:
        """Decide, log once per change, re-read the URL file, then back off before a retry."""
        if failure.kind is FailureKind.GONE:
            raise AgentExit(EXIT_OK, f"the instance is gone ({what}: {failure})")
        if failure.kind is FailureKind.FORBIDDEN:
            raise AgentExit(
                EXIT_CONFIG,
                f"the control plane refused this worker ({what}: {failure}); check INSTANCE_ID",
            )
        if failure.kind is FailureKind.UNREACHABLE:
            if self.state.unreachable_since is None:
                self.state.unreachable_since = time.monotonic()
                self._unreachable_wall = time.time()
                log.warning(
                    "control plane unreachable since %s (%s to %s failed: %s)",
                    _iso(self._unreachable_wall),
                    what,
                    self.urls.current,
                    failure,
                )
        else:
            self._reachable()
            text = str(failure)
            if text != self._last_rejection:
                self._last_rejection = text
                log.error("control plane rejected the %s: %s; retrying with backoff", what, text)
        if self.urls.refresh():
            self._url_adopted()
            self._backoff.reset()
            return
        self._check_orphan()
        delay = self._backoff.next_delay()
        if failure.retry_after_s is not None:
            delay = max(delay, min(failure.retry_after_s, self.config.retry_cap_s))
        remaining = self._orphan_remaining()
        if remaining is not None:
            delay = min(delay, max(0.05, remaining))
        await self._pause(delay, steady=False)
        self._check_orphan()

    def _reachable(self) -> None:
        if self.state.unreachable_since is not None:
            down = time.monotonic() - self.state.unreachable_since
            log.info("control plane reachable again at %s after %.1fs", self.urls.current, down)
            self.state.unreachable_since = None
            self._unreachable_wall = None
        self._last_rejection = None

    def _orphan_remaining(self) -> float | None:
        limit = self.config.orphan_shutdown_s
        since = self.state.unreachable_since
        if limit <= 0 or since is None:
            return None
        return limit - (time.monotonic() - since)

    def _check_orphan(self) -> None:
        remaining = self._orphan_remaining()
        if remaining is not None and remaining <= 0:
            self._orphaned = True
            assert self._unreachable_wall is not None
            raise AgentExit(
                EXIT_ORPHAN,
                f"control plane unreachable since {_iso(self._unreachable_wall)} "
                f"(WORKER_ORPHAN_SHUTDOWN_S={self.config.orphan_shutdown_s:g}): dead-man switch, "
                "stopping the engine"
                + (" and running WORKER_SHUTDOWN_COMMAND" if self.config.shutdown_command else ""),
            )

    async def _pause(self, seconds: float, *, steady: bool) -> None:
        """Sleep, waking early on a pushed URL (and, between heartbeats, on a status change so
        the control plane hears about `ready` at once rather than one interval later)."""
        events = [self._url_changed] + ([self._status_changed] if steady else [])
        if any(e.is_set() for e in events):
            for e in events:
                e.clear()
            return
        waiters = [asyncio.create_task(e.wait()) for e in events]
        try:
            # FIRST_COMPLETED: the default (ALL_COMPLETED) would sleep the whole interval unless
            # the URL and the status both changed.
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            for e in events:
                e.clear()

    # ----------------------------------------------------------------- URL, status, engine

    def _adopt_url(self, raw: str, source: str) -> bool:
        changed = self.urls.adopt(raw, source)
        if changed:
            self._url_adopted()
        return changed

    def _adopt_pushed_url(self, raw: str) -> bool:
        return self._adopt_url(raw, "POST /control/url")

    def _url_adopted(self) -> None:
        self.state.url_changes += 1
        self.state.control_plane_url = self.urls.current
        self._url_changed.set()

    def _token_hash(self) -> str | None:
        token = self.creds.worker_token
        return hash_token(token) if token else None

    def _engine_changed(self) -> None:
        self.state.engine_ready = self.engine.phase is EnginePhase.READY
        self.state.engine_restarts = self.engine.restarts
        self.state.engine_pid = self.engine.pid
        self._refresh_status()

    def _refresh_status(self) -> None:
        if self._shutting_down:
            return
        if self.state.desired_state is DesiredState.DRAIN:
            status = WorkerStatus.DRAINING
        elif self.engine.phase is EnginePhase.ERROR:
            status = WorkerStatus.ERROR
        elif self.engine.phase is EnginePhase.READY:
            status = WorkerStatus.READY
        else:
            status = WorkerStatus.STARTING
        if status is not self.state.status:
            if status is WorkerStatus.ERROR:
                log.error("status %s -> error: %s", self.state.status.value, self.engine.error)
            else:
                log.info("status %s -> %s", self.state.status.value, status.value)
            self.state.status = status
            self._status_changed.set()
