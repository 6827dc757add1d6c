"""Capped exponential backoff with jitter (pure)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from cachewarden.writebehind.backoff import backoff_ms

ATTEMPTS = st.integers(min_value=-3, max_value=200)
BASES = st.integers(min_value=0, max_value=60_000)
CAPS = st.integers(min_value=0, max_value=3_600_000)


class _Fixed(random.Random):
    """A Random whose random() always returns one value."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def _window(attempt: int, base_ms: int, cap_ms: int) -> int:
    return int(min(cap_ms, base_ms * 2 ** max(0, min(attempt - 1, 30))))


@given(ATTEMPTS, BASES, CAPS, st.randoms(use_true_random=False))
def test_delay_is_within_half_window_and_cap(
    attempt: int, base_ms: int, cap_ms: int, rng: random.Random
) -> None:
    """The delay lies in [window/2, window] of min(cap, base*2^(n-1)), so never above the cap."""
    delay = backoff_ms(attempt, base_ms, cap_ms, rng)
    window = _window(attempt, base_ms, cap_ms)
    assert window // 2 <= delay <= window <= cap_ms
    assert isinstance(delay, int)


@given(st.integers(min_value=1, max_value=100), BASES, CAPS)
def test_window_never_shrinks(attempt: int, base_ms: int, cap_ms: int) -> None:
    """With the same draw, a later attempt never waits less than an earlier one."""
    for draw in (0.0, 0.5, 0.999999):
        earlier = backoff_ms(attempt, base_ms, cap_ms, _Fixed(draw))
        later = backoff_ms(attempt + 1, base_ms, cap_ms, _Fixed(draw))
        assert later >= earlier


def test_grows_exponentially_until_the_cap() -> None:
    """The lowest delay doubles per attempt from base/2 until it reaches cap/2."""
    lowest = [backoff_ms(n, 100, 5_000, _Fixed(0.0)) for n in range(1, 10)]
    assert lowest == [50, 100, 200, 400, 800, 1600, 2500, 2500, 2500]
    highest = [backoff_ms(n, 100, 5_000, _Fixed(0.999999)) for n in range(1, 10)]
    assert highest == [99, 199, 399, 799, 1599, 3199, 4999, 4999, 4999]


def test_jitter_spreads_over_the_window() -> None:
    """Random draws cover the window's upper half, not one point."""
    rng = random.Random(7)
    delays = [backoff_ms(20, 500, 30_000, rng) for _ in range(2_000)]
    assert min(delays) >= 15_000
    assert max(delays) <= 30_000
    assert min(delays) < 16_000 and max(delays) > 29_000
    assert len(set(delays)) > 1_000


def test_huge_attempt_numbers_stay_capped() -> None:
    """A shard that failed thousands of times still waits at most the cap."""
    assert backoff_ms(10_000, 500, 30_000, _Fixed(0.999999)) <= 30_000
    assert backoff_ms(10_000, 500, 30_000, _Fixed(0.0)) == 15_000


def test_default_rng_is_used_without_one() -> None:
    """Without an rng argument the module's random source is used and bounds still hold."""
    for _ in range(100):
        assert 250 <= backoff_ms(1, 500, 30_000) <= 500
