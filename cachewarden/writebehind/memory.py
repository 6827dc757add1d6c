"""Refusing writes before Redis runs out of memory, so the buffer can always drain.

Under `noeviction` a full Redis refuses every command that adds memory: then
neither new writes nor the flusher's locks and markers (nor a broker on that
Redis, nor a worker starting on it) could go on, and nothing would ever drain.
So enqueue.lua looks at Redis's memory (INFO memory, at most every 100 ms,
remembered in a mark key) and stops taking writes a headroom short of
`maxmemory` (`[redis] memory_headroom`, 10%): they get a Backpressure naming
memory, with no extra round trip, and are taken again once the flushers have
freed some (the mark lapses after a second). The scripts that drain the buffer
may run at the limit too (`allow-oom`).
"""

from __future__ import annotations

from cachewarden.errors import Backpressure


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
