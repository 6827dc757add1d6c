"""The `cachewarden scheduler` process: APScheduler driving the periodic work.

Today it runs the write-behind dispatcher (redundantly with the one in each
worker: the due-set claim keeps it to one flush per due time). Warming jobs
declared in the config join it here.
"""

from __future__ import annotations

import signal
from types import FrameType

import structlog
from apscheduler.schedulers.blocking import BlockingScheduler
from redis.exceptions import RedisError

from cachewarden.celeryconf import task_client
from cachewarden.context import Context
from cachewarden.settings import Settings
from cachewarden.writebehind.dispatch import FLUSH_TASK, dispatch_once

log = structlog.get_logger("cachewarden.scheduler")


def build_scheduler(settings: Settings) -> BlockingScheduler:
    """A blocking scheduler with the dispatcher as an interval job."""
    context = Context.build(settings)
    client = task_client(settings)

    def send(entity: str, shard: int) -> None:
        client.send_task(FLUSH_TASK, args=[entity, shard])

    def dispatch() -> None:
        try:
            dispatch_once(context, send)
        except RedisError as exc:
            log.warning("dispatch_failed", error=str(exc))

    scheduler = BlockingScheduler(timezone="UTC")
    scheduler.add_job(
        dispatch,
        "interval",
        seconds=settings.dispatch_interval_ms / 1000,
        id="write-behind-dispatch",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
    )
    return scheduler


def run_scheduler(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT."""
    scheduler = build_scheduler(settings)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        scheduler.shutdown(wait=False)

    signal.signal(signal.SIGTERM, stop)
    log.info("scheduler_started", jobs=[job.id for job in scheduler.get_jobs()])
    scheduler.start()
