"""The read path's tasks (refresh-ahead): decode arguments, call the core, map the outcome.

A refresh or sweep that did its work ends as SUCCESS. One that met a fault ends as
RETRY or FAILURE in Celery's events (and Flower), never as SUCCESS:

- a refresh whose load failed, or that found Redis unavailable, is sent again
  (`REFRESH_RETRIES` times at most, backing off: `retry_delay_s`) with the keys it
  left unreloaded, then raises RefreshFailed (FAILURE);
- a sweep that found Redis unavailable is retried the same way; one whose reload
  failed raises RefreshFailed at once (FAILURE): the keys it claimed keep their
  refresh markers, and the next sweep after they lapse claims them again.

The entries keep their value meanwhile (within their stale grace).
"""

from __future__ import annotations

from typing import Any, NoReturn

import structlog
from celery import Task, shared_task
from redis.exceptions import RedisError

from cachewarden.context import current
from cachewarden.errors import BackendUnavailable, RefreshFailed
from cachewarden.readpath.refresh import REFRESH_RETRIES, REFRESH_TASK, refresh_keys, retry_delay_s
from cachewarden.readpath.sweep import SWEEP_TASK, sweep_entity

log = structlog.get_logger("tasks.readpath")


def _retry(
    task: Task[Any, Any], entity: str, problem: RefreshFailed, args: tuple[Any, ...] | None = None
) -> NoReturn:
    """Send the task again (with `args`, else its own) after its backoff (RETRY), or raise
    `problem` (FAILURE) once its retries are spent."""
    delay = retry_delay_s(current().entity(entity), task.request.retries)
    raise task.retry(args=args, kwargs={}, exc=problem, countdown=delay)


@shared_task(
    name=REFRESH_TASK,
    bind=True,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    serializer="json",
    max_retries=REFRESH_RETRIES,
    throws=(RefreshFailed,),
)
def refresh(
    self: Task[Any, Any], entity: str, keys: list[str], horizon_ms: int | None = None
) -> dict[str, Any]:
    """Reload `keys` of `entity` before they expire (one SELECT ... IN per batch)."""
    with structlog.contextvars.bound_contextvars(task_id=self.request.id):
        keys = [str(k) for k in keys]
        try:
            result = refresh_keys(current(), entity, keys, horizon_ms)
        except (RedisError, BackendUnavailable) as exc:
            log.error("refresh_redis_unavailable", entity=entity, keys=len(keys), error=str(exc))
            problem = RefreshFailed(f"{entity}: Redis is unavailable ({exc}); {len(keys)} keys")
            _retry(self, entity, problem, (entity, keys, horizon_ms))
        log.info(
            "refresh_done",
            entity=entity,
            batch_size=result.asked,
            leased=result.leased,
            filled=result.filled,
            batches=result.batches,
            error=result.error,
        )
        if result.error is not None:
            problem = RefreshFailed(
                f"{entity}: {len(result.pending)} keys not reloaded: {result.error}"
            )
            _retry(self, entity, problem, (entity, result.pending, horizon_ms))
        return {k: v for k, v in result.__dict__.items() if k != "pending"}


@shared_task(
    name=SWEEP_TASK,
    bind=True,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    serializer="json",
    max_retries=REFRESH_RETRIES,
    throws=(RefreshFailed,),
)
def sweep(self: Task[Any, Any], entity: str) -> dict[str, Any]:
    """Reload, in this task, every hot key of `entity` that expires within its refresh window.

    The workers' refresh-ahead threads do this on their own schedule (sending the
    batches to "cachewarden.refresh"); this task is for a sweep on demand.
    """
    with structlog.contextvars.bound_contextvars(task_id=self.request.id):
        try:
            result = sweep_entity(current(), entity)
        except (RedisError, BackendUnavailable) as exc:
            log.error("sweep_redis_unavailable", entity=entity, error=str(exc))
            _retry(self, entity, RefreshFailed(f"{entity}: Redis is unavailable ({exc})"))
        filled = sum(r.filled for r in result.refreshed)
        log.info("sweep_done", entity=entity, keys=result.claimed, filled=filled)
        if result.error is not None:
            raise RefreshFailed(
                f"{entity}: the sweep claimed {result.claimed} keys and reloaded {filled}: "
                f"{result.error}"
            )
        return {"entity": entity, "claimed": result.claimed, "filled": filled}
