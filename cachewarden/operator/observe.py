"""What Redis says about each entity right now: for `cachewarden status` and the metrics.

Read, never written: pending writes and their lag (the age of the oldest pending
write, from its stream id), dead letters, writes enqueued since the streams were
made (`XINFO STREAM` entries-added), the read counters, the last flush and
sweep, and the workers that beat recently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from cachewarden.keys import Keyspace
from cachewarden.settings import Settings
from cachewarden.writebehind.shardcount import buffered_shards

# A worker whose dispatcher last beat longer ago than this is not listed as seen.
SEEN_WITHIN_MS = 60_000


@dataclass
class EntityState:
    """One entity, as Redis holds it now."""

    pending: int = 0
    lag_s: float = 0.0
    dead_letters: int = 0
    enqueued: int = 0
    reads: dict[str, float] = field(default_factory=dict)
    last_flush_ms: int | None = None
    last_sweep_ms: int | None = None


def redis_now_ms(client: Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def entity_state(settings: Settings, client: Redis) -> dict[str, EntityState]:
    """Every configured entity's state, in two pipelined round trips: the shard counts
    Redis records (the streams read are those of the record, not the config's count,
    and both counts' during a reshard "N>M": `shardcount.buffered_shards`), then the
    rest."""
    keys = Keyspace(settings.redis.prefix)
    specs = list(settings.entities.values())
    with client.pipeline(transaction=False) as pipe:
        pipe.time()
        for spec in specs:
            pipe.get(keys.shard_count(spec.name))
        (seconds, micros), *records = pipe.execute()
    now = int(seconds) * 1000 + int(micros) // 1000
    counts = [
        buffered_shards(record, spec.write_behind.shards)
        for spec, record in zip(specs, records, strict=True)
    ]
    with client.pipeline(transaction=False) as pipe:
        for spec, count in zip(specs, counts, strict=True):
            for shard in range(count):
                stream = keys.stream(spec.name, shard)
                pipe.xlen(stream)
                pipe.xrange(stream, count=1)
                pipe.execute_command("XINFO", "STREAM", stream)  # type: ignore[no-untyped-call]
            pipe.xlen(keys.dead(spec.name))
            pipe.hgetall(keys.read_stats(spec.name))
            pipe.hgetall(keys.flush_stats(spec.name))
        replies = iter(pipe.execute(raise_on_error=False))
    out: dict[str, EntityState] = {}
    for spec, count in zip(specs, counts, strict=True):
        state = out.setdefault(spec.name, EntityState())
        for _ in range(count):
            length, first, info = next(replies), next(replies), next(replies)
            state.pending += length if isinstance(length, int) else 0
            if isinstance(first, list) and first:
                oldest = int(str(first[0][0]).split("-")[0])
                state.lag_s = max(state.lag_s, (now - oldest) / 1000)
            state.enqueued += _entries_added(info)
        dead, reads, flushes = next(replies), next(replies), next(replies)
        state.dead_letters = dead if isinstance(dead, int) else 0
        if isinstance(reads, dict):
            state.reads = {k: _number(v) for k, v in reads.items()}
            sweep = reads.get("last_sweep_ms")
            state.last_sweep_ms = int(sweep) if sweep else None
        if isinstance(flushes, dict) and flushes.get("last_flush_ms"):
            state.last_flush_ms = int(flushes["last_flush_ms"])
    return out


def _entries_added(info: Any) -> int:
    """`entries-added` of an XINFO STREAM reply (a flat list, or a dict)."""
    if isinstance(info, dict):
        return int(info.get("entries-added", 0))
    if isinstance(info, list):
        pairs = dict(zip(info[::2], info[1::2], strict=False))
        return int(pairs.get("entries-added", 0))
    return 0  # no stream yet


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def seen_workers(settings: Settings, client: Redis) -> dict[str, int]:
    """Worker nodes whose dispatcher beat within the last minute: node -> when (ms)."""
    keys = Keyspace(settings.redis.prefix)
    now = redis_now_ms(client)
    found: Any = client.zrangebyscore(keys.workers(), now - SEEN_WITHIN_MS, "+inf", withscores=True)
    return {str(node): int(score) for node, score in found}
