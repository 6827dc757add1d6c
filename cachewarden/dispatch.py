"""Finding the shards whose flush is due and sending one flush task for each.

Any number of dispatchers may run (one in each worker, one in each scheduler):
a shard is claimed with a marker set only if absent, so each due time sends
one task. If that task is lost, the marker expires and the shard is sent again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from cachewarden.keys import parse_due_member
from cachewarden.loops import run_every
from cachewarden.runtime import Runtime

log = structlog.get_logger("cachewarden.dispatch")

FLUSH_TASK = "cachewarden.flush"
Send = Callable[[str, int], None]


def claim_due(rt: Runtime, most: int = 1000) -> list[tuple[str, int]]:
    """Claim the due shards no flush is queued for; return (entity, shard) pairs."""
    marker_ttl = max(
        (e.write_behind.lock_ttl_ms for e in rt.settings.entities.values()), default=10_000
    )
    members: list[str] = rt.scripts.dispatch(
        keys=[rt.keys.due()], args=[marker_ttl, most, rt.keys.stream_prefix()]
    )
    claimed = []
    for member in members:
        entity, shard = parse_due_member(member)
        if entity in rt.settings.entities:
            claimed.append((entity, shard))
        else:
            log.warning(
                "dispatch_unknown_entity",
                entity=entity,
                shard=shard,
                detail="writes are buffered for an entity the config no longer defines",
            )
    return claimed


def dispatch_once(rt: Runtime, send: Send) -> int:
    """Send a flush for every due shard; return how many were sent."""
    sent = 0
    for entity, shard in claim_due(rt):
        send(entity, shard)
        sent += 1
    return sent


def run_dispatcher(rt: Runtime, send: Send, stop: threading.Event) -> None:
    """Dispatch every `dispatch_interval` until `stop` is set; survive Redis outages."""
    interval = rt.settings.dispatch_interval_ms / 1000
    run_every(interval, lambda: dispatch_once(rt, send), stop, "dispatch")
