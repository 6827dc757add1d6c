"""The write buffer and Redis's memory: writes refused short of maxmemory, and the sum of
what the buffers' bounds can take.

Under `noeviction` a full Redis refuses every command that adds memory: then
neither new writes nor the flusher's locks and markers (nor a broker on that
Redis, nor a worker starting on it) could go on, and nothing would ever drain.
So enqueue.lua looks at Redis's memory (INFO memory, at most every 100 ms,
remembered in a mark key) and stops taking writes a headroom short of
`maxmemory` (`[redis] memory_headroom`, 10%): they get a Backpressure naming
memory, with no extra round trip, and are taken again once the flushers have
freed some (the mark lapses after a second). The scripts that drain the buffer
may run at the limit too (`allow-oom`).

`memory_fit` (what `cachewarden doctor` checks) sums the bytes the entities' full
buffers would hold (max_pending x shards writes, each sized from sampled entries)
against that limit.
"""

from __future__ import annotations

from typing import Any

from cachewarden.errors import Backpressure
from cachewarden.keys import Keyspace
from cachewarden.settings import Settings


def memory_refusal(entity: str, address: str, mark: str) -> Backpressure:
    """Why a write was not taken while Redis is short of memory."""
    used, limit = (int(n) for n in mark.split())
    return Backpressure(
        f"{entity}: Redis at {address} uses {_mb(used)} of its maxmemory {_mb(limit)}, past "
        "the write headroom ([redis] memory_headroom); the write was not taken. The "
        "flushers free memory as they drain the buffer; if this persists, raise maxmemory "
        "or add flushers"
    )


def full_redis(entity: str, address: str, error: str) -> Backpressure:
    """Redis itself refused a write for memory (OOM): a Backpressure, not an outage."""
    return Backpressure(
        f"{entity}: Redis at {address} is at its maxmemory ({error}); the write was not "
        "taken. The flushers free memory as they drain the buffer; raise maxmemory or "
        "[redis] memory_headroom if this recurs"
    )


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MB"


# Redis bytes per pending write beyond its row's JSON: the stream entry's fields and
# ids, the dirty-hash field, key names (measured: about 1.5 KB over a 1 KB row).
PENDING_OVERHEAD_BYTES = 500
ASSUMED_ROW_BYTES = 1024


def buffer_need(settings: Settings, client: Any, keys: Keyspace) -> tuple[float, list[str]]:
    """The bytes the entities' full write buffers need (max_pending x shards x a write's
    size, sampled from cached entries, else assumed), and each entity's share in words."""
    need, parts = 0.0, []
    for spec in settings.entities.values():
        entries = client.scan_iter(keys.entry_pattern(spec.name), count=100)
        sizes = [int(client.strlen(k)) for _, k in zip(range(100), entries, strict=False)]
        sizes = sizes or [ASSUMED_ROW_BYTES]
        # A pending write holds its row twice (entry and stream entry).
        per_write = 2 * sum(sizes) / len(sizes) + PENDING_OVERHEAD_BYTES
        bound = spec.write_behind.max_pending * spec.write_behind.shards
        need += bound * per_write
        parts.append(f"{spec.name}: {bound:,} writes x ~{per_write / 1024:.1f} KB")
    return need, parts


def memory_fit(settings: Settings, client: Any, keys: Keyspace) -> list[str]:
    """Warnings where the entities' max_pending bounds cannot fit in Redis's maxmemory
    (less the write headroom). Row sizes are sampled from cached entries, else assumed."""
    limit = int(client.info("memory").get("maxmemory", 0))
    if limit == 0:
        return ["Redis has no maxmemory: a full buffer grows until the host runs out of memory"]
    room = limit * (1 - settings.redis.memory_headroom)
    need, parts = buffer_need(settings, client, keys)
    if need <= room:
        return []
    return [
        f"the write buffers' bounds need about {need / 1048576:,.0f} MB ({'; '.join(parts)}), "
        f"more than Redis's maxmemory {limit / 1048576:,.0f} MB less the write headroom "
        f"({room / 1048576:,.0f} MB): writes would meet Backpressure for memory before "
        "max_pending. Lower write_behind.max_pending or shards, or raise maxmemory"
    ]
