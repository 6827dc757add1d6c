"""Capped exponential backoff with full jitter (pure)."""

from __future__ import annotations

import random


def backoff_ms(attempt: int, base_ms: int, cap_ms: int, rng: random.Random | None = None) -> int:
    """Delay before retry number `attempt` (1-based): uniform in [cap/2, cap] of base*2^(n-1).

    Half the window is kept so retries never bunch at zero; the cap bounds the wait.
    """
    window = min(cap_ms, base_ms * (2 ** max(0, min(attempt - 1, 30))))
    draw = (rng or random).random()
    return int(window / 2 + draw * window / 2)
