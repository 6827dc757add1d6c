"""The sweep: reloading hot keys before they expire, without waiting for a read.

Every worker runs a background loop (worker/steps.py). Once per sweep period
per entity (a Redis guard admits one worker), it claims the hot keys expiring
within the sweep window (the refresh window plus two sweep periods, so it gets
there before their readers would) and sends them in batches to refresh tasks.

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
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import structlog

from cachewarden.context import Context
from cachewarden.loops import run_every
from cachewarden.readpath.refresh import (
    RefreshResult,
    SendRefresh,
    read_scripts,
    refresh_keys,
    send_requests,
)
from cachewarden.settings import EntitySettings

log = structlog.get_logger("cachewarden.sweep")

SWEEP_TASK = "cachewarden.sweep"


@dataclass
class SweepResult:
    """What one sweep of an entity did."""

    entity: str
    claimed: int = 0
    batches: int = 0
    refreshed: list[RefreshResult] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        """The error of the inline reload that failed, if one did."""
        return next((r.error for r in self.refreshed if r.error is not None), None)


def sweep_window_ms(spec: EntitySettings) -> int:
    """How long before expiry the sweep reloads a hot key: the refresh window plus two
    sweep periods, so the sweep gets there before the key's readers would have to ask."""
    window = spec.refresh_window_ms
    if window <= 0:
        return 0
    return max(window, min(window + 2 * spec.sweep_period_ms, spec.ttl_ms * 95 // 100))


def claim_expiring(
    context: Context, spec: EntitySettings, most: int
) -> tuple[int, bool, list[str]]:
    """Claim up to `most` hot keys expiring within the sweep window.

    Returns (horizon_ms, whether due keys may be left, the keys claimed).
    """
    side = read_scripts(context, spec.name)
    found = side.sweep_candidates(sweep_window_ms(spec), most)
    more = len(found.hot) + len(found.warm) >= most
    return found.horizon_ms, more, side.sweep_claim(found)


def sweep_entity(context: Context, entity: str, send: SendRefresh | None = None) -> SweepResult:
    """Claim every hot key of `entity` near expiry and reload it (inline, or via `send`).

    Reloading inline, it stops at the first batch whose load fails (`error`); the keys
    it claimed and could not reload are claimed again once their markers lapse."""
    spec = context.entity(entity)
    result = SweepResult(entity)
    if spec.refresh_window_ms <= 0:
        return result
    more, idle = True, 0
    while more and idle < 10:  # 10 calls in a row that claim nothing: readers race us
        horizon, more, keys = claim_expiring(context, spec, spec.refresh_batch_size)
        idle = 0 if keys else idle + 1
        if not keys:
            continue
        result.claimed += len(keys)
        result.batches += 1
        if send is not None:
            send(entity, keys, horizon)
            continue
        refreshed = refresh_keys(context, entity, keys, horizon)
        result.refreshed.append(refreshed)
        if refreshed.error is not None:
            break  # the database fails: claim no more keys that this sweep cannot reload
    return result


def sweep_due(context: Context, send: SendRefresh) -> list[SweepResult]:
    """Sweep each entity whose sweep period is up, once across all workers (a Redis guard)."""
    done = []
    for spec in context.settings.entities.values():
        if spec.refresh_window_ms <= 0:
            continue
        guard = context.keys.sweep_guard(spec.name)
        if context.redis.set(guard, "1", nx=True, px=spec.sweep_period_ms):
            done.append(sweep_entity(context, spec.name, send))
            stats = context.keys.read_stats(spec.name)
            context.redis.hset(stats, "last_sweep_ms", int(time.time() * 1000))
    return done


def tick_s(context: Context) -> float:
    """How often the refresh-ahead loop runs: the dispatch interval (to send the refreshes
    reads ask for), or half the shortest sweep period where that is shorter."""
    settings = context.settings
    periods = [s.sweep_period_ms for s in settings.entities.values() if s.refresh_window_ms]
    shortest = min([*periods, 2 * settings.dispatch_interval_ms])
    return max(0.02, shortest / 2000)


def run_refresh_ahead(context: Context, send: SendRefresh, stop: threading.Event) -> None:
    """Send requested refreshes and sweep until `stop` is set; survive Redis and broker outages."""

    def tick() -> None:
        send_requests(context, send)
        for result in sweep_due(context, send):
            if result.claimed:
                log.info(
                    "sweep_done", entity=result.entity, keys=result.claimed, batches=result.batches
                )

    run_every(tick_s(context), tick, stop, "refresh_ahead")
