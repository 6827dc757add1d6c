"""Changing an entity's shard count (`cachewarden reshard ENTITY N`).

It refuses writes (Backpressure) while it drains the buffer through the old
shards into the database, then records the new count (see shardcount.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

from cachewarden.context import Context
from cachewarden.errors import CachewardenError
from cachewarden.writebehind.flush import flush_shard


def reshard(context: Context, entity: str, target: int, say: Callable[[str], None] = print) -> int:
    """Move `entity`'s write buffer to `target` shards: refuse writes, drain every old
    shard into the database, record the new count. Returns the old count."""
    if not 1 <= target <= 1024:
        raise CachewardenError(f"{entity}: a shard count is 1 to 1024, not {target}")
    spec = context.entity(entity)
    redis, record = context.redis, context.keys.shard_count(entity)
    current = cast("str | None", redis.get(record)) or str(spec.write_behind.shards)
    old = int(current.split(">")[0])
    if old == target and ">" not in current:
        say(f"{entity}: already {target} shards")
        return old
    redis.set(record, f"{old}>{target}")
    say(f"{entity}: writes paused; draining {old} shards")
    while True:
        pending = sum(int(redis.xlen(context.keys.stream(entity, s))) for s in range(old))
        if pending == 0:
            break
        busy = 0
        for shard in range(old):
            result = flush_shard(context, entity, shard)
            if result.status == "backoff":
                say(f"{entity}:{shard}: {'; '.join(result.errors)}; retrying")
                time.sleep(result.retry_in_ms / 1000)  # the shard's own backoff
            busy += result.status == "busy"
        if busy:
            time.sleep(0.05)  # a worker is flushing those shards: look again shortly
    redis.set(record, str(target))
    say(f"{entity}: {old} -> {target} shards; writes with shards = {target} are taken")
    return old
