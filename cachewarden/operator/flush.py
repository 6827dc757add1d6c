"""Draining the write buffer now (`cachewarden flush`), for example before a deploy.

Every shard with pending writes is made due at once (score 0 in the due set), so
the workers' dispatchers send its flush without waiting for `max_delay`; the
drain waits until the streams are empty, saying every few seconds how many
writes are left, and why it may be stuck when none moved for a while.

The shards are those of the count Redis records (writebehind/shardcount.py), not
the config's: a reshard to more shards leaves writes on shard numbers a config
that was not changed lacks, and they are drained too. The record is read again
with the streams' lengths on every look, in one transaction, so a reshard that
finishes meanwhile is followed and the drain never ends while a shard of the
count in force holds a write.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from redis import Redis

from cachewarden.keys import Keyspace, due_member
from cachewarden.writebehind.shardcount import buffered_shards

REPORT_EVERY_S = 5.0
STUCK_AFTER_S = 10.0


def drain(
    client: Redis,
    keys: Keyspace,
    configured: Mapping[str, int],
    timeout_s: float,
    report: Callable[[str], None],
    queue: str,
) -> tuple[int, int]:
    """Flush every pending write of the entities in `configured` (name -> the config's
    shard count, used only while Redis records none) now and wait: (writes pending at
    first, left)."""
    look = _Looker(client, keys, configured)
    lengths = look()
    first = left = sum(lengths.values())
    started = told = moved = time.monotonic()
    last = left
    while left:
        due = {due_member(name, s): 0 for (name, s), n in lengths.items() if n}
        if due:
            client.zadd(keys.due(), due)
        now = time.monotonic()
        if now - started > timeout_s:
            return first, left
        if left < last:
            moved, last = now, left
        if now - told >= REPORT_EVERY_S:
            told = now
            stuck = ""
            if now - moved >= STUCK_AFTER_S:
                stuck = (
                    f" (none drained for {now - moved:.0f}s: are workers consuming {queue}? "
                    "is the database up?)"
                )
            report(f"{left:,} of {first:,} writes pending{stuck}")
        time.sleep(0.1)
        lengths = look()
        left = sum(lengths.values())
    return first, 0


class _Looker:
    """The length of every shard stream that can hold the entities' pending writes."""

    def __init__(self, client: Redis, keys: Keyspace, configured: Mapping[str, int]) -> None:
        self.client, self.keys, self.configured = client, keys, configured
        self.names = list(configured)
        self.records: list[str | None] = [None] * len(self.names)  # as of the last look

    def __call__(self) -> dict[tuple[str, int], int]:
        """(entity, shard) -> stream length, for the shards of the counts Redis records
        (`buffered_shards`), read with the records in one MULTI: when a record moved
        since the last look, the streams of its new count are read again."""
        names, keys = self.names, self.keys
        while True:
            streams = [
                (name, s)
                for name, record in zip(names, self.records, strict=True)
                for s in range(buffered_shards(record, self.configured[name]))
            ]
            with self.client.pipeline(transaction=True) as pipe:
                for name in names:
                    pipe.get(keys.shard_count(name))
                for name, s in streams:
                    pipe.xlen(keys.stream(name, s))
                replies = pipe.execute()
            records, lengths = replies[: len(names)], replies[len(names) :]
            if records == self.records:
                return {stream: int(n) for stream, n in zip(streams, lengths, strict=True)}
            self.records = records
