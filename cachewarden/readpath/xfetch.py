"""When a read should ask for an early refresh: the refresh-ahead factor, or XFetch.

Plain arithmetic, no Redis. Before its one round trip, a read asks
`refresh_below_ms` how little time may be left on the entry before it asks for a
refresh; the read script compares the entry's remaining time with that and, when
it is due, records the request in the same round trip.

- Factor (Oracle Coherence's refresh-ahead-factor): an entry is due once
  `refresh_ahead` of its TTL has passed, i.e. when at most `(1 - refresh_ahead) * ttl`
  remains. 0 turns it off.
- XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015): recompute early when
  `now - delta * beta * ln(random()) >= expiry`, where delta is how long a
  recomputation takes (here: the measured delay from asking for a refresh to its
  fill, queue time included). The chance grows smoothly as expiry nears, so
  readers of one key spread their triggers instead of all firing at one instant.

An entry past its TTL but inside its stale grace (`stale_ttl`) is always due:
it is being served stale, so it must be revalidated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FACTOR = "factor"
XFETCH = "xfetch"


@dataclass(frozen=True)
class EarlyRefresh:
    """An entity's early-refresh rule."""

    mode: str = FACTOR
    factor: float = 0.8
    beta: float = 1.0

    def due(self, ttl_ms: int, remaining_ms: int, delay_ms: float | None, rand: float) -> bool:
        """True when a read that found `remaining_ms` of `ttl_ms` left should ask for a refresh.

        `remaining_ms` is the time to the entry's (logical) expiry and is 0 or less
        in the stale grace; `delay_ms` the measured refresh delay (None: unknown);
        `rand` a uniform random number in (0, 1].
        """
        return remaining_ms <= self.refresh_below_ms(ttl_ms, delay_ms, rand)

    def refresh_below_ms(self, ttl_ms: int, delay_ms: float | None, rand: float) -> float:
        """The most time left (ms) at which a read of an entry with `ttl_ms` asks for a refresh.

        Never below 0, so an entry in its stale grace (0 or less left) is always due.
        """
        if self.factor <= 0:
            return 0.0
        if self.mode == XFETCH and delay_ms is not None and delay_ms > 0:
            rand = min(max(rand, 1e-300), 1.0)
            return -delay_ms * self.beta * math.log(rand)
        return ttl_ms * (1 - self.factor)


def factor_due(ttl_ms: int, remaining_ms: int, factor: float) -> bool:
    """True once `factor` of the TTL has passed (factor 0: never)."""
    if factor <= 0:
        return False
    return remaining_ms <= ttl_ms * (1 - factor)


def xfetch_due(remaining_ms: float, delay_ms: float, beta: float, rand: float) -> bool:
    """XFetch: true when `-delay * beta * ln(rand)` reaches the time left before expiry."""
    if remaining_ms <= 0:
        return True
    rand = min(max(rand, 1e-300), 1.0)
    return -delay_ms * beta * math.log(rand) >= remaining_ms
