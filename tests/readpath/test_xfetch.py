"""The early-refresh decision (refresh-ahead factor and XFetch) as pure functions."""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from cachewarden.readpath.xfetch import EarlyRefresh, factor_due, xfetch_due

TTLS = st.integers(min_value=1, max_value=86_400_000)
FACTORS = st.floats(min_value=0.01, max_value=0.99)
UNIT = st.floats(min_value=1e-12, max_value=1.0)


@given(TTLS, FACTORS, st.integers(min_value=0, max_value=86_400_000))
def test_factor_is_due_from_its_point_on(ttl: int, factor: float, remaining: int) -> None:
    """Once a factor decision is due at some remaining time, it stays due as expiry nears."""
    if factor_due(ttl, remaining, factor):
        assert all(factor_due(ttl, r, factor) for r in (remaining // 2, remaining // 10, 0))
    assert factor_due(ttl, remaining, factor) == (remaining <= ttl * (1 - factor))


@given(TTLS, st.integers(min_value=1, max_value=86_400_000))
def test_factor_zero_never_refreshes_a_fresh_entry(ttl: int, remaining: int) -> None:
    """refresh_ahead = 0 turns early refresh off while the entry is fresh."""
    assert not factor_due(ttl, remaining, 0.0)
    assert not EarlyRefresh("factor", 0.0).due(ttl, remaining, None, 0.5)


@given(st.sampled_from(["factor", "xfetch"]), TTLS, st.integers(-86_400_000, 0), UNIT)
def test_an_entry_in_its_stale_grace_is_always_due(
    mode: str, ttl: int, remaining: int, rand: float
) -> None:
    """An entry served stale (no time left before its logical expiry) always asks for a refresh."""
    assert EarlyRefresh(mode, 0.0).due(ttl, remaining, 50.0, rand)
    assert EarlyRefresh(mode, 0.8).due(ttl, remaining, 50.0, rand)


@given(
    st.floats(min_value=1, max_value=1e7),
    st.floats(min_value=0.1, max_value=1e5),
    st.floats(min_value=0.1, max_value=10),
    UNIT,
)
def test_xfetch_fires_exactly_when_the_random_draw_is_small_enough(
    remaining: float, delay: float, beta: float, rand: float
) -> None:
    """XFetch is due iff rand <= exp(-remaining / (delay * beta)), Vattani et al.'s rule."""
    threshold = math.exp(-remaining / (delay * beta))
    if abs(rand - threshold) > 1e-9 * max(threshold, 1e-300):
        assert xfetch_due(remaining, delay, beta, rand) == (rand <= threshold)


@given(st.floats(min_value=1, max_value=1e6), st.floats(min_value=1, max_value=1e4), UNIT)
def test_xfetch_is_monotonic_in_time_left(remaining: float, delay: float, rand: float) -> None:
    """For one random draw, a decision that is due stays due with less time left."""
    if xfetch_due(remaining, delay, 1.0, rand):
        assert xfetch_due(remaining / 2, delay, 1.0, rand)


def test_xfetch_probability_grows_towards_expiry() -> None:
    """Over many reads, the share that refresh early rises as expiry nears (and matches e^-r/d)."""
    rng = random.Random(7)
    draws = [1.0 - rng.random() for _ in range(20_000)]
    shares = []
    for remaining in (400, 200, 100, 50, 10):
        share = sum(xfetch_due(remaining, 100, 1.0, u) for u in draws) / len(draws)
        assert abs(share - math.exp(-remaining / 100)) < 0.02
        shares.append(share)
    assert shares == sorted(shares)


def test_xfetch_without_a_measured_delay_falls_back_to_the_factor() -> None:
    """Before any refresh delay has been measured, XFetch mode decides by the factor."""
    rule = EarlyRefresh("xfetch", 0.8, 1.0)
    assert rule.due(1000, 150, None, 0.999)
    assert not rule.due(1000, 900, None, 1e-9)
