"""Sign-in attempts, limited per client address and overall (the token is the console's only
secret: guessing it must be slow for one address and for a botnet alike).

A fixed window per key, counted on the injected clock so the limits are tested without
sleeping; in memory, per process (each replica limits its own share: N replicas allow N times
the overall budget, still far below what guessing a 32-byte token needs). A library such as
`limits` does this too, but reads the wall clock itself; this is the whole of the rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from receiver.domain import Clock

WINDOW_SECONDS = 60.0
PER_ADDRESS = 10  # attempts per address per window
OVERALL = 100  # attempts per process per window, whoever makes them
_MAX_KEYS = 10_000  # addresses remembered per window (a flood of addresses cannot grow memory)


@dataclass
class _Window:
    started: float
    counts: dict[str, int] = field(default_factory=dict)
    total: int = 0


class SignInThrottle:
    def __init__(
        self,
        clock: Clock,
        *,
        per_address: int = PER_ADDRESS,
        overall: int = OVERALL,
        window_seconds: float = WINDOW_SECONDS,
    ) -> None:
        self.clock = clock
        self.per_address = per_address
        self.overall = overall
        self.window_seconds = window_seconds
        self._window = _Window(started=-math.inf)

    def attempt(self, address: str) -> float | None:
        """Count one attempt from `address`; None if it may go on, else the seconds to wait."""
        now = self.clock().timestamp()
        w = self._window
        if now >= w.started + self.window_seconds:
            w = self._window = _Window(started=now)
        wait = max(1.0, w.started + self.window_seconds - now)
        if w.total >= self.overall:
            return wait
        used = w.counts.get(address, 0)
        if used >= self.per_address:
            return wait
        if address not in w.counts and len(w.counts) >= _MAX_KEYS:
            return wait  # too many addresses this window: the overall limit in another form
        w.counts[address] = used + 1
        w.total += 1
        return None
