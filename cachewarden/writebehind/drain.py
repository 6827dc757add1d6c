"""Draining the write buffer now (`cachewarden flush`), for example before a deploy.

Every shard with pending writes is made due at once (score 0 in the due set), so
the workers' dispatchers send its flush without waiting for `max_delay`; the
drain waits until the streams are empty, saying every few seconds how many
writes are left, and why it may be stuck when none moved for a while.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from redis import Redis

from cachewarden.keys import Keyspace, due_member

REPORT_EVERY_S = 5.0
STUCK_AFTER_S = 10.0


def drain(
    client: Redis,
    keys: Keyspace,
    shards: Mapping[str, int],
    timeout_s: float,
    report: Callable[[str], None],
    queue: str,
) -> tuple[int, int]:
    """Flush the `shards` of each entity now and wait: (writes pending at first, left)."""
    streams = [(name, s) for name, n in shards.items() for s in range(n)]

    def lengths() -> list[int]:
        with client.pipeline(transaction=False) as pipe:
            for name, s in streams:
                pipe.xlen(keys.stream(name, s))
            return [int(n) for n in pipe.execute()]

    first = left = sum(lengths())
    started = told = moved = time.monotonic()
    last = left
    while left:
        due = {due_member(name, s): 0 for (name, s), n in zip(streams, lengths(), strict=True) if n}
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
        left = sum(lengths())
    return first, 0
