"""The warming tasks: a run (its first chunk and its plan) and its chunks."""

from __future__ import annotations

from typing import Any

import structlog
from celery import Task, shared_task

from cachewarden.context import current
from cachewarden.warming.run import CHUNK_TASK, WARM_TASK, run_chunk, start_run

log = structlog.get_logger("tasks.warming")


# A run streams the keys of its whole query while it plans: give it the hour a job's
# default timeout gives (each chunk task keeps the default limits).
@shared_task(
    name=WARM_TASK,
    bind=True,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    serializer="json",
    soft_time_limit=3600,
    time_limit=3660,
)
def warm(
    self: Task[Any, Any], job: str, slot_ms: int | None = None, request: str = ""
) -> dict[str, Any]:
    """Run warming job `job` for its due time `slot_ms` (None: on demand).

    Reads and fills the first chunk here and sends the rest as `warm_chunk` tasks
    over keyset ranges. A failing query raises WarmFailed: FAILURE in Flower, with
    the database's error, and the run recorded as failed.
    """

    def send(name: str, run: int, index: int, lo: str, hi: str | None, rows: int) -> None:
        warm_chunk.apply_async(args=(name, run, index, lo, hi, rows))

    with structlog.contextvars.bound_contextvars(task_id=self.request.id, job=job):
        return start_run(current(), job, slot_ms, request, send)


@shared_task(name=CHUNK_TASK, bind=True, ignore_result=True)
def warm_chunk(
    self: Task[Any, Any],
    job: str,
    run: int,
    index: int,
    lo: str,
    hi: str | None,
    rows: int = 0,
) -> dict[str, Any]:
    """Read and fill the rows `lo < key <= hi` of run `run` (about `rows` of them).

    The chunk that finishes the run returns its outcome ("done"); a failing query
    raises WarmFailed (FAILURE) and fails the run.
    """
    with structlog.contextvars.bound_contextvars(task_id=self.request.id, job=job, run=run):
        return run_chunk(current(), job, run, index, lo, hi)
