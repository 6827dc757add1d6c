"""The recorded shard count of each entity's write buffer, which every process follows.

A key's shard is `crc32(key) % shards`: two writers with different counts would
put one key's writes on two streams, which two flushers could apply out of
order. So Redis records one count per entity (the first write records it), and
every script that picks a key's shard checks the count its caller used against
the record in the same call: enqueue.lua and replay.lua take nothing and answer
"!SHARDS <record>", warm_fill.lua answers {-3, record}.

Processes follow the record, not their config: `current()` reads it (at most
every FRESH_S seconds, and at once when a script said it moved; the write path
reads it only once, `known()`, as enqueue.lua checks every call), so
`cachewarden reshard ENTITY N` (reshard.py) takes effect in running workers,
warm runs and applications without a restart. While a reshard drains, the record
is "N>M": writes are refused with Backpressure and the flushers use N. A config
whose count differs from the record is followed by nothing but this warning
(`check_shards`): its count only seeds the record of a new entity.
"""

from __future__ import annotations

import threading
import time
from typing import cast

import structlog
from redis import Redis

from cachewarden.connections import REDIS_DOWN
from cachewarden.context import Context
from cachewarden.errors import BackendUnavailable, Backpressure
from cachewarden.keys import Keyspace
from cachewarden.settings import EntitySettings

log = structlog.get_logger("cachewarden.shards")

# How long a process trusts the count it read; a script that finds the record moved
# makes it read again at once, so this only bounds how late a process notices on its own.
FRESH_S = 1.0


def count_of(record: str) -> int:
    """The count writers and flushers use under `record`: N of "N", and of "N>M" (a
    reshard to M draining: the old shards are flushed, writes are refused)."""
    return int(record.split(">", 1)[0])


def buffered_shards(record: str | None, configured: int) -> int:
    """How many of an entity's shard streams can hold its pending writes under `record`
    (as `recorded` returns it): N of "N"; of "N>M", the larger of N and M (the old
    shards drain, and the new ones take writes the moment the record says M); the
    config's count `configured` while none is recorded. For whatever counts or flushes
    every pending write (`cachewarden flush`, stats, status): shard numbers from 0."""
    if record is None:
        return configured
    old, _, new = record.partition(">")
    return max(int(old), int(new or old))


def recorded(redis: Redis, keys: Keyspace, entity: str) -> str | None:
    """The entity's record as Redis holds it now ("N", "N>M"), or None before any write."""
    return cast("str | None", redis.get(keys.shard_count(entity)))


class _Seen:
    """A process's view of one entity's count: the count and when it was read."""

    def __init__(self) -> None:
        self.view: tuple[int, float] | None = None  # (count, time.monotonic() of the read)
        self.lock = threading.Lock()


def _seen(context: Context, entity: str) -> _Seen:
    return context.shared("shard_count", entity, _Seen)


def current(context: Context, entity: str) -> int:
    """The shard count of `entity`'s write buffer as Redis records it (N while a reshard
    N>M drains), read at most every FRESH_S; the config's count while none is recorded
    (the first write records it)."""
    seen = _seen(context, entity)
    view = seen.view
    if view is not None and time.monotonic() - view[1] < FRESH_S:
        return view[0]
    return _read(context, entity, seen)


def known(context: Context, entity: str) -> int:
    """The count this process last saw for `entity` (read from Redis only when it has seen
    none). For the write path: enqueue.lua checks the count of every call against the
    record, and a refusal ("!SHARDS <record>") is learnt at once, so a write costs no
    read of its own; `current()` and `holds()`, which flushers call, keep it fresh too."""
    view = _seen(context, entity).view
    return view[0] if view is not None else _read(context, entity, _seen(context, entity))


def reread(context: Context, entity: str) -> int:
    """`current()`, read from Redis now (a caller that has reason to doubt its view)."""
    return _read(context, entity, _seen(context, entity))


def learn(context: Context, entity: str, record: str) -> int:
    """Take `record` as the entity's count, as a script just answered it ("!SHARDS <record>"):
    no read of its own. Returns the count it means."""
    count = count_of(record)
    _seen(context, entity).view = (count, time.monotonic())
    return count


def holds(context: Context, entity: str, shard: int) -> bool:
    """Whether `shard` is one of the entity's shards at the recorded count. A shard past
    the count this process last read makes it read again first (a reshard to more
    shards may have just finished), so a flush of a new shard is never turned away."""
    if shard < current(context, entity):
        return True
    return shard < reread(context, entity)


def _read(context: Context, entity: str, seen: _Seen) -> int:
    with seen.lock:
        try:
            record = recorded(context.redis, context.keys, entity)
        except REDIS_DOWN as exc:
            raise BackendUnavailable(
                f"{entity}: Redis at {context.settings.redis.shown} is unreachable ({exc}); "
                "the write buffer's shard count could not be read"
            ) from None
        count = context.entity(entity).write_behind.shards if record is None else count_of(record)
        seen.view = (count, time.monotonic())
        return count


def check_shards(context: Context) -> list[str]:
    """At start: record each entity's configured shard count where none is recorded; where
    the record differs from the config (or a reshard runs), log a warning saying that
    this process follows the record and how to make the config true. Returns the
    warnings (none when every config matches its record)."""
    redis, keys = context.redis, context.keys
    warnings: list[str] = []
    for spec in context.settings.entities.values():
        ours = str(spec.write_behind.shards)
        record = keys.shard_count(spec.name)
        found = recorded(redis, keys, spec.name)
        if found is None:  # (only then a write: this runs at maxmemory too)
            redis.set(record, ours, nx=True)
            found = recorded(redis, keys, spec.name)
        if found is None:
            continue
        learn(context, spec.name, found)
        if found == ours:
            continue
        warning = shards_differ(spec, found)
        log.warning(
            "shard_count_differs",
            entity=spec.name,
            configured=spec.write_behind.shards,
            recorded=found,
            detail=warning,
        )
        warnings.append(warning)
    return warnings


def shards_differ(spec: EntitySettings, record: str) -> str:
    """What a process whose config says another count than Redis records is told."""
    ours = spec.write_behind.shards
    field = f"entities.{spec.name}.write_behind.shards"
    if ">" in record:
        old, new = record.split(">", 1)
        return (
            f"{field} says {ours}; a reshard of {spec.name} from {old} to {new} shards is "
            f"draining (cachewarden reshard): this process flushes the {old} old shards, "
            f"and writes are taken again with {new} once it has drained"
        )
    return (
        f"{field} says {ours}, but Redis records {record} shards for this entity's write "
        f"buffer: this process follows the record ({record} shards) and ignores the "
        f"config's count. Set it to {record}, or run `cachewarden reshard {spec.name} "
        f"{ours}` to move the buffer to {ours} shards"
    )


def shards_refusal(spec: EntitySettings, record: str) -> Backpressure:
    """Why a write (or replay) was not taken when Redis answered "!SHARDS <record>":
    a reshard drains ("N>M"), or the count moved again while it was sent."""
    if ">" in record:
        old, new = record.split(">", 1)
        return Backpressure(
            f"{spec.name}: the write buffer is being resharded from {old} to {new} shards "
            "(cachewarden reshard); writes are taken again once it has drained"
        )
    return Backpressure(
        f"{spec.name}: the shard count Redis records moved to {record} while the write was "
        "sent; it was not taken. Retry it"
    )
