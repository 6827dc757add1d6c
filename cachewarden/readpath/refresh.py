"""Refresh-ahead: reloading entries in batches before they expire, so hot keys never miss.

Two triggers, neither on a reader's time:

- on read: a read that finds its entry due (`readpath.xfetch`) sets the key's
  refresh marker (`SET NX`: one refresh per key in flight) and records the key
  in the entity's refresh requests, inside its one read script. Every worker's
  background loop takes the requests (`take_requests`, a `ZPOPMIN`, so each
  request goes to one worker) and sends them as "cachewarden.refresh" tasks of
  up to `refresh_batch_size` keys;
- on schedule: the sweep (`readpath.sweep`) claims hot keys near expiry.

A batch reload is one lease script, one `SELECT ... WHERE key IN (...)` and one
fill script, whatever its size (up to `refresh_batch_size` keys).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from cachewarden import metrics
from cachewarden.codec import encode_entry
from cachewarden.context import Context
from cachewarden.errors import InvalidValue, LoadFailed
from cachewarden.readpath.misses import leases_kept
from cachewarden.readpath.sqlload import loader_for
from cachewarden.scripts.readpath import ReadScripts, failure_hold_ms, new_token
from cachewarden.settings import EntitySettings
from cachewarden.writebehind import shardcount

log = structlog.get_logger("cachewarden.refresh")

REFRESH_TASK = "cachewarden.refresh"

# send(entity, keys, horizon_ms): hand a batch to a refresh task
SendRefresh = Callable[[str, list[str], int | None], None]


# A refresh task that met a fault is sent again at most this many times (then FAILURE).
REFRESH_RETRIES = 3


@dataclass
class RefreshResult:
    """What one refresh did: keys asked for, leased (needing a reload), filled; and after a
    failed load, its error and the keys it left unreloaded (that batch's and the rest)."""

    entity: str
    asked: int = 0
    leased: int = 0
    filled: int = 0
    batches: int = 0
    error: str | None = None
    pending: list[str] = field(default_factory=list)


def retry_delay_s(spec: EntitySettings, attempt: int) -> float:
    """How long a refresh that met a fault waits before its `attempt`-th retry (0-based):
    twice the failure hold, doubling (the keys' failure markers are gone by then)."""
    return 2 * failure_hold_ms(spec) / 1000 * 2.0**attempt


def read_scripts(context: Context, entity: str) -> ReadScripts:
    """The context's read-path scripts of `entity`, whose dirty hashes are those of the
    shard count Redis records (shardcount.known for a read, shardcount.current for a
    fill or lease), not the config's."""
    spec = context.entity(entity)
    name = spec.name
    return context.shared(
        "read_scripts",
        entity,
        lambda: ReadScripts(
            context.lua,
            context.keys,
            spec,
            known=lambda: shardcount.known(context, name),
            current=lambda: shardcount.current(context, name),
        ),
    )


def refresh_keys(
    context: Context, entity: str, keys: Sequence[str], horizon_ms: int | None = None
) -> RefreshResult:
    """Reload `keys` in batches, skipping those that need no reload (see lease_many.lua).

    `horizon_ms` (Redis clock): reload only entries that expire by then, so a key
    that was reloaded since the refresh was asked for is left alone. A failing
    database is logged and counted (`refresh_errors`); entries keep their value, and
    the result names the error and the keys left unreloaded (`pending`), for the
    caller to retry or report. A Redis error propagates.
    """
    spec = context.entity(entity)
    side = read_scripts(context, entity)
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
            with leases_kept(side, leased, token):
                values = _load(context, spec, leased)
        except LoadFailed as exc:
            side.give_up(leased, token, exc.problem, counter="refresh_errors")
            log.error("refresh_failed", entity=entity, keys=len(leased), error=str(exc))
            result.error = str(exc)
            result.pending = [*leased, *keys[start + size :]]
            return result
        except BaseException:
            side.give_up(leased, token)
            raise
        skipped = [k for k in leased if k not in values]
        if skipped:
            side.give_up(skipped, token)
        filled = side.fill_many(values, token)
        result.filled += filled
        metrics.emit("refreshed_rows", filled, entity=entity)
    return result


def _load(context: Context, spec: EntitySettings, keys: list[str]) -> dict[str, str]:
    """Load a batch and encode it: a key with no row becomes a known-absent entry."""
    rows = loader_for(context, spec.name).load_many(keys)
    values: dict[str, str] = {}
    for key in keys:
        row = rows.get(key)
        try:
            values[key] = encode_entry(spec.name, key, row, spec.max_value_bytes)
        except InvalidValue as exc:
            log.warning("refresh_row_not_cached", entity=spec.name, key=key, error=str(exc))
    return values


def send_requests(context: Context, send: SendRefresh, most_batches: int = 10) -> int:
    """Send the refreshes that reads asked for, in batches; return how many keys were sent.

    Taking a request removes it (ZPOPMIN), so each goes to one worker. A request
    lost with a dying worker is asked for again by the key's next read once its
    refresh marker expires (`lock_timeout`).
    """
    sent = 0
    for spec in context.settings.entities.values():
        if spec.refresh_ahead <= 0 and spec.stale_ttl_ms <= 0:
            continue
        side = read_scripts(context, spec.name)
        for _ in range(most_batches):
            taken = side.take_requests(spec.refresh_batch_size)
            if not taken:
                break
            send(spec.name, [key for key, _ in taken], int(max(h for _, h in taken)))
            sent += len(taken)
            if len(taken) < spec.refresh_batch_size:
                break
    return sent
