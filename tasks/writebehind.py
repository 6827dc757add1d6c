"""The write-behind flush task: decode arguments, call the core, log the outcome."""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task, shared_task
from redis.exceptions import RedisError

from cachewarden.context import current
from cachewarden.writebehind.dispatch import FLUSH_TASK
from cachewarden.writebehind.flush import flush_shard

log = structlog.get_logger("tasks.writebehind")


@shared_task(name=FLUSH_TASK, bind=True, ignore_result=True)
def flush(self: Task[Any, Any], entity: str, shard: int) -> dict[str, Any]:
    """Drain one shard of an entity's write buffer into the database.

    Nothing is retried here: a failed flush leaves its entries unacknowledged
    in Redis, and the dispatcher sends the shard again after the backoff.
    """
    with structlog.contextvars.bound_contextvars(task_id=self.request.id):
        try:
            result = flush_shard(current(), entity, int(shard))
        except RedisError as exc:
            log.error("flush_redis_unavailable", entity=entity, shard=shard, error=str(exc))
            return {"entity": entity, "shard": shard, "status": "redis_unavailable"}
        log.info(
            "flush_done",
            entity=entity,
            shard=shard,
            status=result.status,
            batch_size=result.entries,
            applied=result.applied,
            rejected=result.rejected,
        )
        return result.__dict__
