"""A watchdog process, one per engine, that kills the engine's process group once the agent is
gone, even when the agent died by SIGKILL or the OOM killer and could not clean up itself.

It learns of the agent's death without polling and without prctl: it blocks reading a pipe
whose only writer is the agent, and the kernel closes that pipe when the agent exits.
Usage (by the agent only): python -m inventiv.agent.guard <pgid> <stop_timeout_s>
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pgid: int, timeout_s: float) -> None:
    """SIGTERM the group, give it `timeout_s` to exit, then SIGKILL what is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str]) -> int:
    pgid, timeout_s = int(argv[1]), float(argv[2])
    for sig in (signal.SIGINT, signal.SIGHUP):  # a closing terminal must not disarm the guard
        signal.signal(sig, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):  # returns b"" only when the agent's end is closed
        pass
    stop_group(pgid, timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
