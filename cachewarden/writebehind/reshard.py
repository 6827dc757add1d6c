"""Changing an entity's shard count (`cachewarden reshard ENTITY N`).

It records "old>new" (writes are refused with Backpressure, flushers keep the old
count), drains the buffer through the old shards into the database, then
records the new count (see shardcount.py). Running workers, warm runs and
applications follow the record within about a second, or at once when a script
tells them: none needs a restart, nor a config change (the config's count only
seeds the record of a new entity; set it to the new count to silence the warning
a differing one logs at start).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import WatchError

from cachewarden.context import Context
from cachewarden.errors import CachewardenError
from cachewarden.writebehind import shardcount
from cachewarden.writebehind.flush import flush_shard


def reshard(context: Context, entity: str, target: int, say: Callable[[str], None] = print) -> int:
    """Move `entity`'s write buffer to `target` shards: refuse writes, drain every old
    shard into the database, record the new count. Returns the old count."""
    if not 1 <= target <= 1024:
        raise CachewardenError(f"{entity}: a shard count is 1 to 1024, not {target}")
    spec = context.entity(entity)
    redis, record = context.redis, context.keys.shard_count(spec.name)
    while True:
        found = shardcount.recorded(redis, context.keys, spec.name)
        current = found or str(spec.write_behind.shards)
        old = shardcount.count_of(current)
        if old == target and ">" not in current:
            say(f"{entity}: already {target} shards")
            return old
        if _swap(redis, record, found, f"{old}>{target}"):
            break  # (else a first write or another reshard moved it: look again)
    shardcount.learn(context, spec.name, f"{old}>{target}")
    say(f"{entity}: writes paused; draining {old} shards")
    _drain(context, spec.name, old, say)
    if not _swap(redis, record, f"{old}>{target}", str(target)):
        raise CachewardenError(
            f"{entity}: the shard count record changed while this reshard drained "
            f"(another `cachewarden reshard {entity}`?); it now says "
            f"{shardcount.recorded(redis, context.keys, spec.name)!r}"
        )
    shardcount.learn(context, spec.name, str(target))
    say(f"{entity}: {old} -> {target} shards; writes go to {target} shards")
    return old


def _drain(context: Context, entity: str, old: int, say: Callable[[str], None]) -> None:
    """Flush the old shards until their streams are empty (no write is taken meanwhile)."""
    redis = context.redis
    while True:
        pending = sum(int(redis.xlen(context.keys.stream(entity, s))) for s in range(old))
        if pending == 0:
            return
        busy = 0
        for shard in range(old):
            result = flush_shard(context, entity, shard)
            if result.status == "backoff":
                say(f"{entity}:{shard}: {'; '.join(result.errors)}; retrying")
                time.sleep(result.retry_in_ms / 1000)  # the shard's own backoff
            busy += result.status == "busy"
        if busy:
            time.sleep(0.05)  # a worker is flushing those shards: look again shortly


def _swap(redis: Redis, record: str, expected: str | None, new: str) -> bool:
    """Set `record` to `new` only while it holds `expected` (None: absent)."""
    with redis.pipeline() as pipe:
        try:
            pipe.watch(record)  # type: ignore[no-untyped-call]
            if pipe.get(record) != expected:
                return False
            pipe.multi()
            pipe.set(record, new)
            pipe.execute()
        except WatchError:
            return False
    return True
