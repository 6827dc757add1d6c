"""Finding the shards whose flush is due and sending one flush task for each.

Any number of dispatchers may run (one in each worker, one in each scheduler):
a shard is claimed with its queued marker, set only if absent, so each due time
sends one task, and the marker lasts until the flush runs (its lock then keeps
it) or `requeue_after`: however long the queue, a shard has one flush queued. If
the task is lost, the marker expires and the shard is sent again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from cachewarden.context import Context
from cachewarden.keys import parse_due_member
from cachewarden.loops import run_every
from cachewarden.scripts.writebehind import claim_shards, due_shards

log = structlog.get_logger("cachewarden.dispatch")

FLUSH_TASK = "cachewarden.flush"
_reported: set[str] = set()  # entities not in the config, logged once per process
Send = Callable[[str, int], None]


def claim_due_shards(context: Context, most: int = 1000) -> list[tuple[str, int]]:
    """Claim the due shards no flush is queued for; return (entity, shard) pairs."""
    settings, keys = context.settings, context.keys
    marker_ttl = max(
        [
            settings.requeue_after_ms,
            *(e.write_behind.lock_ttl_ms for e in settings.entities.values()),
        ]
    )
    due = [parse_due_member(m) for m in due_shards(context.lua, keys, most)]
    for entity, shard in due:
        if entity not in settings.entities and entity not in _reported:
            _reported.add(entity)
            log.warning(
                "dispatch_unknown_entity",
                entity=entity,
                shard=shard,
                detail="writes are buffered for an entity the config no longer defines; "
                "they are left alone (cachewarden stats lists them)",
            )
    due = [(entity, shard) for entity, shard in due if entity in settings.entities]
    if not due:
        return []
    taken = claim_shards(context.lua, [keys.queued(e, s) for e, s in due], marker_ttl)
    return [pair for pair, ok in zip(due, taken, strict=True) if ok]


def dispatch_once(context: Context, send: Send) -> int:
    """Send a flush for every due shard; return how many were sent."""
    sent = 0
    for entity, shard in claim_due_shards(context):
        send(entity, shard)
        sent += 1
    return sent


def run_dispatcher(
    context: Context,
    send: Send,
    stop: threading.Event,
    beat: Callable[[], None] | None = None,
) -> None:
    """Dispatch every `dispatch_interval` until `stop` is set; survive Redis outages.

    `beat()` is called on every pass, failed or not: the loop's own progress (the
    worker's liveness), which an outage of Redis does not stop.
    """
    interval = context.settings.dispatch_interval_ms / 1000

    def tick() -> None:
        if beat is not None:
            beat()
        dispatch_once(context, send)

    run_every(interval, tick, stop, "dispatch")
