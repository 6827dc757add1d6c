"""The read path's tasks (refresh-ahead): decode arguments, call the core, log the outcome."""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task, shared_task
from redis.exceptions import RedisError

from cachewarden.context import current
from cachewarden.readpath.refresh import REFRESH_TASK, refresh_keys
from cachewarden.readpath.sweep import SWEEP_TASK, sweep_entity

log = structlog.get_logger("tasks.readpath")


@shared_task(name=REFRESH_TASK, bind=True, ignore_result=True)
def refresh(
    self: Task[Any, Any], entity: str, keys: list[str], horizon_ms: int | None = None
) -> dict[str, Any]:
    """Reload `keys` of `entity` before they expire (one SELECT ... IN per batch).

    Nothing is retried here: a failed reload is logged and counted, the entries
    keep their value (within their stale grace), and the next read or sweep
    asks again once the key's refresh marker expires.
    """
    with structlog.contextvars.bound_contextvars(task_id=self.request.id):
        try:
            result = refresh_keys(current(), entity, [str(k) for k in keys], horizon_ms)
        except RedisError as exc:
            log.error("refresh_redis_unavailable", entity=entity, keys=len(keys), error=str(exc))
            return {"entity": entity, "status": "redis_unavailable"}
        log.info(
            "refresh_done",
            entity=entity,
            batch_size=result.asked,
            leased=result.leased,
            filled=result.filled,
            batches=result.batches,
            error=result.error,
        )
        return result.__dict__


@shared_task(name=SWEEP_TASK, bind=True, ignore_result=True)
def sweep(self: Task[Any, Any], entity: str) -> dict[str, Any]:
    """Reload, in this task, every hot key of `entity` that expires within its refresh window.

    The workers' refresh-ahead threads do this on their own schedule (sending the
    batches to "cachewarden.refresh"); this task is for a sweep on demand.
    """
    with structlog.contextvars.bound_contextvars(task_id=self.request.id):
        try:
            result = sweep_entity(current(), entity)
        except RedisError as exc:
            log.error("sweep_redis_unavailable", entity=entity, error=str(exc))
            return {"entity": entity, "status": "redis_unavailable"}
        filled = sum(r.filled for r in result.refreshed)
        log.info("sweep_done", entity=entity, keys=result.claimed, filled=filled)
        return {"entity": entity, "claimed": result.claimed, "filled": filled}
