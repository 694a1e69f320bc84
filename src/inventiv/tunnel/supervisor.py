"""Keep cloudflared running: restart it with backoff when it exits, publish each new URL.

A quick tunnel's URL dies with its process, so a restart is not enough: the new URL must reach
the env file and the control plane (which pushes it to workers) before workers notice. The
publisher does that; the supervisor only decides when.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Protocol

from rich.console import Console
from rich.markup import escape

from inventiv.tunnel import output
from inventiv.tunnel.process import CloudflaredProcess, TunnelCancelled, TunnelStartError

POLL_S = 0.5


class Publisher(Protocol):
    def publish(self, url: str, cloudflared_pid: int | None) -> None:
        """Write and announce a URL cloudflared now serves."""

    def tick(self) -> None:
        """Called while cloudflared runs, to retry an announcement that failed."""


UrlSource = Callable[[CloudflaredProcess, Callable[[float], None]], str]


@dataclass(frozen=True)
class SupervisorOptions:
    url_timeout_s: float = 30.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    # A run this long counts as healthy: the next failure starts again from the initial delay.
    stable_after_s: float = 60.0
    echo_all: bool = False


def next_delay(previous: float | None, ran_for_s: float, options: SupervisorOptions) -> float:
    """Exponential backoff, reset after a run that lasted `stable_after_s`."""
    if previous is None or ran_for_s >= options.stable_after_s:
        return options.backoff_initial_s
    return min(options.backoff_max_s, previous * 2)


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        url_source: UrlSource,
        publisher: Publisher,
        console: Console,
        options: SupervisorOptions | None = None,
    ) -> None:
        self.argv = list(argv)
        self.url_source = url_source
        self.publisher = publisher
        self.console = console
        self.options = options or SupervisorOptions()
        self.stop_event = threading.Event()
        self.restarts = 0

    def _echo(self, line: str) -> None:
        if self.options.echo_all or " ERR " in line or " WRN " in line:
            self.console.print(f"[dim]cloudflared:[/dim] {escape(line)}")

    def _on_wait(self, elapsed: float) -> None:
        output.info(
            self.console,
            f"Waiting for cloudflared to publish the tunnel URL... {elapsed:.0f}s "
            f"(gives up after {self.options.url_timeout_s:.0f}s)",
        )

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; True if a stop was requested."""
        return self.stop_event.wait(seconds)

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> int:
        """Run until stopped. Exit status 1 if the very first start fails (nothing to keep)."""
        delay: float | None = None
        first = True
        while not self.stop_event.is_set():
            proc = CloudflaredProcess(self.argv, echo=self._echo)
            proc.cancel = self.stop_event
            proc.start()
            try:
                url = self.url_source(proc, self._on_wait)
            except TunnelCancelled:
                output.info(self.console, "Stopping cloudflared.")
                proc.stop()
                break
            except TunnelStartError as exc:
                proc.stop()
                self._report_start_failure(exc)
                if first:
                    return 1
                delay = next_delay(delay, 0.0, self.options)
                if self._restart_pause(delay):
                    break
                continue
            first = False
            self.publisher.publish(url, proc.pid)
            code = self._watch(proc)
            if code is None:  # stopped by us
                break
            ran_for = time.monotonic() - proc.started_at
            delay = next_delay(delay, ran_for, self.options)
            output.warn(
                self.console,
                f"cloudflared exited (code {code}) after {ran_for:.0f}s; its URL {url} is gone. "
                f"Restarting in {delay:.0f}s.",
            )
            if self._restart_pause(delay):
                break
        return 0

    def _restart_pause(self, delay: float) -> bool:
        self.restarts += 1
        return self._sleep(delay)

    def _watch(self, proc: CloudflaredProcess) -> int | None:
        """Wait for cloudflared to exit (its code) or for a stop request (None, after stopping
        it), retrying pending announcements meanwhile."""
        while True:
            code = proc.wait(POLL_S)
            if code is not None:
                return code
            if self.stop_event.is_set():
                output.info(self.console, "Stopping cloudflared.")
                proc.stop()
                return None
            self.publisher.tick()

    def _report_start_failure(self, exc: TunnelStartError) -> None:
        output.fail(self.console, str(exc))
        output.info(
            self.console,
            "cloudflared needs outbound HTTPS to Cloudflare (api.trycloudflare.com for a quick "
            "tunnel, then port 7844). Re-run with --verbose to see all of its output.",
        )
        if exc.tail:
            output.info(self.console, "Last lines from cloudflared:")
            for line in exc.tail[-15:]:
                output.info(self.console, f"  {line}")
