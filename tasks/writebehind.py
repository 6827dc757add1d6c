"""The write-behind flush task: decode arguments, call the core, report the outcome.

A flush that did its work ends as SUCCESS, its result the entries read, the rows
applied and the dead letters made. One that could not apply its batch raises
FlushFailed, so Celery's events (and Flower) show it as FAILURE; nothing is
retried here: the entries stay unacknowledged in Redis, and the dispatcher sends
the shard again after the backoff.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task, shared_task
from redis.exceptions import RedisError

from cachewarden.context import current
from cachewarden.errors import BackendUnavailable, FlushFailed
from cachewarden.writebehind.dispatch import FLUSH_TASK
from cachewarden.writebehind.flush import flush_shard

log = structlog.get_logger("tasks.writebehind")


@shared_task(
    name=FLUSH_TASK,
    bind=True,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    serializer="json",
    throws=(FlushFailed,),
)
def flush(self: Task[Any, Any], entity: str, shard: int) -> dict[str, Any]:
    """Drain one shard of an entity's write buffer into the database."""
    with structlog.contextvars.bound_contextvars(task_id=self.request.id):
        try:
            result = flush_shard(current(), entity, int(shard))
        except (RedisError, BackendUnavailable) as exc:
            log.error("flush_redis_unavailable", entity=entity, shard=shard, error=str(exc))
            raise FlushFailed(
                f"{entity}:{shard}: Redis is unavailable ({exc}); the entries stay pending"
            ) from None
        log.info(
            "flush_done",
            entity=entity,
            shard=shard,
            status=result.status,
            batch_size=result.entries,
            applied=result.applied,
            rejected=result.rejected,
        )
        if result.status in ("backoff", "fenced"):
            retry = f", sent again in {result.retry_in_ms} ms" if result.retry_in_ms else ""
            raise FlushFailed(
                f"{entity}:{shard}: {result.status}: {'; '.join(result.errors)} "
                f"(the entries stay pending{retry})"
            )
        return {
            "entity": entity,
            "shard": int(shard),
            "status": result.status,
            "entries": result.entries,
            "applied": result.applied,
            "dead_letters": result.rejected,
            "locked": result.locked,
            "batches": result.batches,
        }
