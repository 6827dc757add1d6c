"""Changing an entity's shard count (`cachewarden reshard ENTITY N`).

It records "old>new" (writes are refused with Backpressure, flushers keep the old
count), drains the buffer through the old shards into the database, then
records the new count (see shardcount.py). Running workers, warm runs and
applications follow the record within about a second, or at once when a script
tells them: none needs a restart, nor a config change (the config's count only
seeds the record of a new entity; set it to the new count to silence the warning
a differing one logs at start).

A drain that cannot finish because the entity holds `max_dead_letters` (no flush
takes a batch then) stops with ReshardStopped naming the dead letters and the
command to handle them. The record is set back to the old count, as before the
reshard: a draining record refuses replays (and writes), and the letters must be
replayed or dropped before the drain can go on. Running the reshard again then
starts it over from there (a reshard stopped otherwise, say by Ctrl-C, leaves
"old>new", which running it again resumes).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis import Redis
from redis.exceptions import WatchError

from cachewarden.context import Context
from cachewarden.errors import CachewardenError
from cachewarden.writebehind import shardcount
from cachewarden.writebehind.deadletters import count_dead
from cachewarden.writebehind.flush import flush_shard


class ReshardStopped(CachewardenError):
    """A reshard's drain cannot go on (the entity holds max_dead_letters); the record is
    back at the old count and the message says what to do before running it again."""


class _Blocked(Exception):
    """The drain met dead letters at their bound: (letters held, writes still pending)."""

    def __init__(self, held: int, pending: int) -> None:
        super().__init__(held, pending)
        self.held, self.pending = held, pending


def reshard(context: Context, entity: str, target: int, say: Callable[[str], None] = print) -> int:
    """Move `entity`'s write buffer to `target` shards: refuse writes, drain every old
    shard into the database, record the new count. Returns the old count.

    Raises ReshardStopped, with the record set back to the old count, when the drain
    meets the entity's max_dead_letters (see the module's docstring)."""
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
    try:
        _drain(context, spec.name, old, say)
    except _Blocked as blocked:
        raise _stopped(context, spec.name, old, target, blocked) from None
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
    """Flush the old shards until their streams are empty (no write is taken meanwhile).
    Raises _Blocked while writes are pending and the entity holds max_dead_letters: no
    flush (this one's or a worker's) takes a batch then, so waiting would never end."""
    redis, keys = context.redis, context.keys
    bound = context.entity(entity).write_behind.max_dead_letters

    def pending() -> int:
        return sum(int(redis.xlen(keys.stream(entity, s))) for s in range(old))

    def check(left: int) -> None:
        held = count_dead(redis, keys, entity)
        if held >= bound:
            raise _Blocked(held, left)

    while True:
        left = pending()
        if left == 0:
            return
        check(left)  # (a worker's flush may have met the bound)
        busy = 0
        for shard in range(old):
            result = flush_shard(context, entity, shard)
            if result.status == "backoff":
                check(pending())
                say(f"{entity}:{shard}: {'; '.join(result.errors)}; retrying")
                time.sleep(result.retry_in_ms / 1000)  # the shard's own backoff
            busy += result.status == "busy"
        if busy:
            time.sleep(0.05)  # a worker is flushing those shards: look again shortly


def _stopped(
    context: Context, entity: str, old: int, target: int, blocked: _Blocked
) -> ReshardStopped:
    """Set the record back from "old>target" to the old count; what the operator is told."""
    bound = context.entity(entity).write_behind.max_dead_letters
    why = (
        f"{entity}: the reshard to {target} shards stopped: {blocked.held:,} dead letters "
        f"are waiting (write_behind.max_dead_letters = {bound}) and no flush takes a batch "
        f"while they are, so {blocked.pending:,} pending write(s) stay on the old shards"
    )
    draining = f"{old}>{target}"
    if not _swap(context.redis, context.keys.shard_count(entity), draining, str(old)):
        now = shardcount.recorded(context.redis, context.keys, entity)
        return ReshardStopped(
            f"{why}; the shard count record changed meanwhile (another `cachewarden "
            f"reshard {entity}`?) and now says {now!r}. See them with `cachewarden "
            f"dead-letters list {entity}`"
        )
    shardcount.learn(context, entity, str(old))
    return ReshardStopped(
        f"{why}. The record is back at {old} shard(s) (a draining reshard refuses "
        f"replays). See them with `cachewarden dead-letters list {entity}`, replay them "
        f"once what the database refused is fixed (`cachewarden dead-letters replay "
        f"{entity}`) or drop them (`cachewarden dead-letters drop {entity}`), then run "
        f"`cachewarden reshard {entity} {target}` again"
    )


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
