"""One cloudflared process: start it, read its output, get its URL, stop it.

cloudflared logs to stderr and may log a lot; a reader thread drains the pipe continuously (a
full pipe would block cloudflared) and keeps the last lines to show when something goes wrong.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from inventiv.tunnel.cloudflared import QuickTunnelURLParser

TAIL_LINES = 40
STOP_GRACE_S = 5.0
_EOF = object()


class TunnelCancelled(Exception):
    """The supervisor was asked to stop while waiting for cloudflared."""


class TunnelStartError(RuntimeError):
    """cloudflared exited or stayed silent before giving a URL; `tail` is its last output."""

    def __init__(self, message: str, tail: Sequence[str]) -> None:
        super().__init__(message)
        self.tail = list(tail)


def _die_with_parent() -> None:
    """Linux: have the kernel SIGTERM cloudflared if its supervisor dies, even by SIGKILL, so a
    crashed `inventiv tunnel` never leaves an orphan tunnel pointing at the API."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class CloudflaredProcess:
    """A running cloudflared and the lines it has printed so far."""

    def __init__(self, argv: Sequence[str], *, echo: Callable[[str], None] | None = None) -> None:
        self.argv = list(argv)
        self._echo = echo
        self._lines: queue.Queue[object] = queue.Queue()
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._proc: subprocess.Popen[str] | None = None
        self.started_at = 0.0
        # Set by the supervisor on Ctrl-C/SIGTERM, so a wait for the URL ends at once.
        self.cancel = threading.Event()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        # Own session: a Ctrl-C in the terminal reaches the supervisor only, which then stops
        # cloudflared itself instead of waiting out cloudflared's 30 s graceful shutdown.
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,
            preexec_fn=_die_with_parent if os.name == "posix" else None,
        )
        self.started_at = time.monotonic()
        threading.Thread(target=self._read, name="cloudflared-output", daemon=True).start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.rstrip("\r\n")
            self.tail.append(line)
            self._lines.put(line)
            if self._echo is not None:
                self._echo(line)
        self._lines.put(_EOF)

    def poll(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def wait_for_line(
        self,
        matches: Callable[[str], str | None],
        *,
        timeout: float,
        on_wait: Callable[[float], None] | None = None,
        progress_every: float = 2.0,
        what: str = "tunnel URL",
    ) -> str:
        """Return `matches(line)` for the first line where it is not None.

        Raises TunnelStartError if cloudflared exits first or nothing matches within `timeout`.
        """
        deadline = time.monotonic() + timeout
        next_progress = time.monotonic() + progress_every
        while True:
            if self.cancel.is_set():
                raise TunnelCancelled()
            now = time.monotonic()
            if now >= deadline:
                raise TunnelStartError(
                    f"cloudflared printed no {what} within {timeout:.0f} s.", self.tail
                )
            try:
                item = self._lines.get(timeout=min(0.2, deadline - now))
            except queue.Empty:
                item = None
            if item is _EOF:
                code = self._proc.wait() if self._proc is not None else None
                raise TunnelStartError(
                    f"cloudflared exited (code {code}) before printing a {what}.", self.tail
                )
            if isinstance(item, str):
                found = matches(item)
                if found is not None:
                    return found
            if on_wait is not None and time.monotonic() >= next_progress:
                on_wait(time.monotonic() - (deadline - timeout))
                next_progress += progress_every

    def wait_for_quick_url(
        self, *, timeout: float, on_wait: Callable[[float], None] | None = None
    ) -> str:
        parser = QuickTunnelURLParser()
        return self.wait_for_line(parser.feed, timeout=timeout, on_wait=on_wait)

    def wait(self, timeout: float) -> int | None:
        """Wait up to `timeout` for the process to exit; its exit code, or None if running."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; safe to call twice."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
