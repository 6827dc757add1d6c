"""Refresh-ahead: reloading entries before they expire, so hot keys never miss.

Two triggers, both asynchronous (no reader waits for them):

- on read: a read that finds its entry due (see `cachewarden.xfetch`) sets the
  key's refresh marker (`SET NX`: one refresh per key in flight) and sends task
  "cachewarden.refresh" by name;
- on schedule: every worker runs a sweeper thread (worker/steps.py). Once per
  sweep period per entity (a Redis guard admits one worker), it claims the hot
  keys expiring within the sweep window (the refresh window plus two sweep
  periods, so it gets there before their readers would) and sends them in batches.

"Hot" is decided by the read script: every hit looks the key up in the entity's
hot index (`cw:@hot:user`, a sorted set scored by the entry's expiry): one
ZSCORE, O(1), inside the same EVALSHA, so no extra round trip; only the first
read after each (re)load adds the key (a ZADD, O(log n)). So a key is hot when
it was read at least once since its last load, and the sweep finds the hot keys
near expiry with one range query on the expiry score. A reload moves a hot key
to the warm index (`cw:@warm:user`): if it is not read again before the next
sweep, it gets one grace reload and is dropped. So a key read at least once
every two refresh cycles (about 1.6 TTLs at refresh_ahead 0.8) never misses;
a key not read for two cycles is left to expire. The indexes hold at most one
member each per key read in the last two cycles; the sweep removes members
whose entries are gone.

A batch reload is one lease script, one `SELECT ... WHERE key IN (...)` and one
fill script, whatever its size (up to `refresh_batch_size` keys).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from cachewarden.codec import ABSENT, encode_row
from cachewarden.errors import InvalidValue, LoadFailed
from cachewarden.leases import EntityLeases, new_token
from cachewarden.loops import run_every
from cachewarden.runtime import Runtime
from cachewarden.settings import EntitySettings

log = structlog.get_logger("cachewarden.refresh")

REFRESH_TASK = "cachewarden.refresh"
SWEEP_TASK = "cachewarden.sweep"

# send(entity, keys, horizon_ms, requested_at_ms)
SendRefresh = Callable[[str, list[str], int | None, int | None], None]


@dataclass
class RefreshResult:
    """What one refresh did: keys asked for, leased (needing a reload), filled."""

    entity: str
    asked: int = 0
    leased: int = 0
    filled: int = 0
    batches: int = 0
    error: str | None = None


@dataclass
class SweepResult:
    """What one sweep of an entity did."""

    entity: str
    claimed: int = 0
    batches: int = 0
    refreshed: list[RefreshResult] = field(default_factory=list)


def refresh_keys(
    rt: Runtime,
    entity: str,
    keys: Sequence[str],
    horizon_ms: int | None = None,
    requested_at_ms: int | None = None,
) -> RefreshResult:
    """Reload `keys` in batches, skipping those that need no reload (see lease_many.lua).

    `horizon_ms` (Redis clock): reload only entries that expire by then, so a key
    that was reloaded since the refresh was asked for is left alone. A failing
    database is logged and counted (`refresh_errors`); entries keep their value.
    """
    spec = rt.entity(entity)
    side = EntityLeases(rt.redis, rt.keys, rt.scripts, spec)
    result = RefreshResult(entity, asked=len(keys))
    size = spec.refresh_batch_size
    for start in range(0, len(keys), size):
        batch = list(keys[start : start + size])
        token = new_token()
        leased = side.lease_many(batch, token, horizon_ms)
        if not leased:
            continue
        result.leased += len(leased)
        result.batches += 1
        try:
            values = _load(rt, spec, leased)
        except LoadFailed as exc:
            side.give_up(leased, token, exc.problem, counter="refresh_errors")
            log.error("refresh_failed", entity=entity, keys=len(leased), error=str(exc))
            result.error = str(exc)
            return result
        except BaseException:
            side.give_up(leased, token)
            raise
        skipped = [k for k in leased if k not in values]
        if skipped:
            side.give_up(skipped, token)
        result.filled += side.fill_many(values, token, requested_at_ms)
    return result


def _load(rt: Runtime, spec: EntitySettings, keys: list[str]) -> dict[str, str]:
    """Load a batch and encode it: a key with no row becomes a known-absent entry."""
    rows = rt.loader(spec.name).load_many(keys)
    values: dict[str, str] = {}
    for key in keys:
        row = rows.get(key)
        try:
            values[key] = (
                ABSENT if row is None else encode_row(spec.name, key, row, spec.max_value_bytes)
            )
        except InvalidValue as exc:
            log.warning("refresh_row_not_cached", entity=spec.name, key=key, error=str(exc))
    return values


def sweep_window_ms(spec: EntitySettings) -> int:
    """How long before expiry the sweep reloads a hot key: the refresh window plus two
    sweep periods, so the sweep gets there before the key's readers would have to ask."""
    window = spec.refresh_window_ms
    if window <= 0:
        return 0
    return max(window, min(window + 2 * spec.sweep_period_ms, spec.ttl_ms * 95 // 100))


def claim_due(rt: Runtime, spec: EntitySettings, most: int) -> tuple[int, bool, list[str]]:
    """Claim up to `most` hot keys expiring within the sweep window.

    Returns (horizon_ms, whether due keys may be left, the keys claimed).
    """
    raw = rt.scripts.sweep_claim(
        keys=[rt.keys.hot(spec.name), rt.keys.warm(spec.name)],
        args=[
            rt.keys.entry_prefix(spec.name),
            rt.keys.refresh_prefix(spec.name),
            sweep_window_ms(spec),
            spec.stale_ttl_ms,
            spec.lock_timeout_ms,
            most,
            spec.ttl_ms,
        ],
    )
    return int(raw[0]), bool(int(raw[1])), [str(k) for k in raw[2:]]


def sweep_entity(rt: Runtime, entity: str, send: SendRefresh | None = None) -> SweepResult:
    """Claim every hot key of `entity` near expiry and reload it (inline, or via `send`)."""
    spec = rt.entity(entity)
    result = SweepResult(entity)
    if spec.refresh_window_ms <= 0:
        return result
    more, idle = True, 0
    while more and idle < 10:  # 10 calls in a row that claim nothing: readers race us
        horizon, more, keys = claim_due(rt, spec, spec.refresh_batch_size)
        idle = 0 if keys else idle + 1
        if not keys:
            continue
        result.claimed += len(keys)
        result.batches += 1
        claimed_at = horizon - sweep_window_ms(spec)
        if send is not None:
            send(entity, keys, horizon, claimed_at)
        else:
            result.refreshed.append(refresh_keys(rt, entity, keys, horizon, claimed_at))
    return result


def sweep_due(rt: Runtime, send: SendRefresh) -> list[SweepResult]:
    """Sweep each entity whose sweep period is up, once across all workers (a Redis guard)."""
    done = []
    for spec in rt.settings.entities.values():
        if spec.refresh_window_ms <= 0:
            continue
        guard = rt.keys.sweep_guard(spec.name)
        if rt.redis.set(guard, "1", nx=True, px=spec.sweep_period_ms):
            done.append(sweep_entity(rt, spec.name, send))
    return done


def sweep_tick_s(rt: Runtime) -> float:
    """How often a sweeper looks for due sweeps: half the shortest sweep period."""
    periods = [s.sweep_period_ms for s in rt.settings.entities.values() if s.refresh_window_ms]
    return max(0.02, min(periods, default=1000) / 2000)


def run_sweeper(rt: Runtime, send: SendRefresh, stop: threading.Event) -> None:
    """Sweep until `stop` is set; survive Redis and broker outages."""

    def sweep() -> None:
        for result in sweep_due(rt, send):
            if result.claimed:
                log.info(
                    "sweep_done", entity=result.entity, keys=result.claimed, batches=result.batches
                )

    run_every(sweep_tick_s(rt), sweep, stop, "sweep")
