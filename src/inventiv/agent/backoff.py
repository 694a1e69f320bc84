"""Retry delays: exponential backoff with full jitter, so a fleet of workers that lost the
control plane at the same instant does not come back at the same instant either."""

from __future__ import annotations

import random

DEFAULT_BASE_S = 0.5
DEFAULT_CAP_S = 60.0


class Backoff:
    """Delay before the next attempt: uniform(0, min(cap, base * 2**attempt)) ("full jitter").

    With `jitter=False` the delay is the upper bound itself, which suits restarting a local
    process (nobody to de-synchronise from, and a predictable delay is easier to read in logs).
    """

    def __init__(
        self,
        base_s: float = DEFAULT_BASE_S,
        cap_s: float = DEFAULT_CAP_S,
        *,
        jitter: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if base_s <= 0 or cap_s <= 0:
            raise ValueError("backoff base and cap must be positive")
        self.base_s = base_s
        self.cap_s = cap_s
        self.jitter = jitter
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        """The largest delay the next attempt may get."""
        # min() on the exponent first keeps 2**attempt from overflowing after days of failures.
        return min(self.cap_s, self.base_s * 2 ** min(self.attempt, 64))

    def next_delay(self) -> float:
        ceiling = self.ceiling()
        self.attempt += 1
        return self._rng.uniform(0.0, ceiling) if self.jitter else ceiling

    def reset(self) -> None:
        self.attempt = 0


def jittered(interval_s: float, fraction: float = 0.1, rng: random.Random | None = None) -> float:
    """`interval_s` +/- `fraction`, so heartbeats of workers started together spread out."""
    r = rng or random
    return max(0.0, interval_s * r.uniform(1.0 - fraction, 1.0 + fraction))
