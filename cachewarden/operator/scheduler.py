"""The `cachewarden scheduler` process: APScheduler firing warming jobs, and dispatching.

Any number of these may run at once. Each warming job is an APScheduler job on
its trigger (warming.schedule); when it wakes, the scheduler claims the due time
in Redis and, if it won, sends a "cachewarden.warm" task to the warming queue.
A fire that fails (the broker or Redis is down) gives its claim back and is
tried again after 1 s, 2 s, 4 s... (at most 30 s) as a catch-up: the due time
fires once the broker is back, within its misfire grace, or is recorded missed.
Once APScheduler has started (so each job's first run is set, and no due
time falls between), it fires the latest due time it finds unfired within the
job's misfire grace (or records it missed). SIGHUP reads the config again and
rebuilds the warming jobs; a config that does not load is logged and the
running jobs stay. SIGTERM or SIGINT stops it.

It also runs the write-behind dispatcher (redundantly with the one in each
worker: the due-set claim keeps it to one flush per due time).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from redis.exceptions import RedisError

from cachewarden.celeryconf import task_client
from cachewarden.context import Context
from cachewarden.errors import CachewardenError
from cachewarden.settings import Settings, WarmingJob, load_settings
from cachewarden.warming.run import WARM_TASK
from cachewarden.warming.schedule import UTC, Firer, check_jobs, grace_ms
from cachewarden.writebehind.dispatch import FLUSH_TASK, dispatch_once

log = structlog.get_logger("cachewarden.scheduler")

DISPATCH_JOB = "write-behind-dispatch"
# A fire that failed (Redis or the broker) is tried again after 1 s, doubling up to this.
RETRY_MAX_S = 30.0
RETRY_PREFIX = "warm-retry:"


class SchedulerProcess:
    """One scheduler: its APScheduler, its context, and the warming jobs it fires."""

    def __init__(self, settings: Settings) -> None:
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.settings = settings
        self.context = Context.build(settings)
        self.client = task_client(settings)
        self.warm_jobs: list[str] = []
        # The warming jobs added and not yet caught up, with the firer of their context.
        self._to_catch_up: list[tuple[Firer, WarmingJob, BaseTrigger]] = []
        self._add_dispatcher()
        self._add_warming(settings, check_jobs(settings))

    def _send_warm(self, job: str, slot_ms: int) -> None:
        self.client.send_task(WARM_TASK, args=[job, slot_ms])

    def _add_dispatcher(self) -> None:
        def send(entity: str, shard: int) -> None:
            self.client.send_task(FLUSH_TASK, args=[entity, shard])

        def dispatch() -> None:
            try:
                dispatch_once(self.context, send)
            except RedisError as exc:
                log.warning("dispatch_failed", error=str(exc))

        self.scheduler.add_job(
            dispatch,
            "interval",
            seconds=self.settings.dispatch_interval_ms / 1000,
            id=DISPATCH_JOB,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )

    def _add_warming(self, settings: Settings, triggers: dict[str, BaseTrigger]) -> None:
        """An APScheduler job per enabled warming job; each one's catch-up waits for
        `_catch_up`."""
        firer = Firer(self.context, self._send_warm, self.name)
        now = datetime.datetime.now(UTC)
        for name, job in settings.warming.items():
            if not job.enabled:
                log.info("warm_job_disabled", job=name)
                continue
            trigger = triggers[name]
            self.scheduler.add_job(
                self._fire,
                trigger,
                args=[firer, job, trigger],
                id=f"warm:{name}",
                name=f"warm {name} ({job.schedule})",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, grace_ms(job, trigger, now) // 1000),
            )
            self.warm_jobs.append(f"warm:{name}")
            self._to_catch_up.append((firer, job, trigger))

    def _catch_up(self) -> None:
        """Fire each added job's latest due time unless a scheduler did (or record it
        missed, past its grace).

        Run once APScheduler has set the jobs' first run times (at its start, or when a
        job is added to it running): each is the first due time from then on, so with
        `now` read after that no due time falls between the catch-up and the first run
        (one that does is claimed once: slot_claim.lua)."""
        now = datetime.datetime.now(UTC)
        while self._to_catch_up:
            firer, job, trigger = self._to_catch_up.pop(0)
            try:
                did = firer.catch_up(job, trigger, now)
            except Exception as exc:  # Redis or the broker: try again shortly
                log.error("warm_catch_up_failed", job=job.name, error=_described(exc))
                self._again(firer, job, trigger, 1)
                continue
            if did in ("fired", "missed"):
                log.info("warm_catch_up", job=job.name, outcome=did)

    def _fire(self, firer: Firer, job: WarmingJob, trigger: BaseTrigger, attempt: int = 0) -> None:
        """One wake-up of a warming job: claim its due time and send the run. A retry
        (`attempt` > 0) catches up instead: it fires the latest due time if no scheduler
        has, or records it missed once past its grace."""
        try:
            if attempt == 0:
                firer.fire(job, trigger)
            else:
                did = firer.catch_up(job, trigger)
                log.info("warm_fire_retried", job=job.name, attempt=attempt, outcome=did)
        except Exception as exc:  # Redis or the broker: the due time was not sent
            log.error("warm_fire_failed", job=job.name, error=_described(exc), attempt=attempt)
            self._again(firer, job, trigger, attempt + 1)

    def _again(self, firer: Firer, job: WarmingJob, trigger: BaseTrigger, attempt: int) -> None:
        """Try a failed fire again after a backoff (1 s, doubling, at most RETRY_MAX_S)."""
        delay = min(2.0 ** (attempt - 1), RETRY_MAX_S)
        at = datetime.datetime.now(UTC) + datetime.timedelta(seconds=delay)
        self.scheduler.add_job(
            self._fire,
            "date",
            run_date=at,
            args=[firer, job, trigger, attempt],
            id=f"{RETRY_PREFIX}{job.name}",
            replace_existing=True,
            misfire_grace_time=None,
        )

    def reload(self, path: str | None) -> None:
        """Read the config again and rebuild the warming jobs (keep them if it fails)."""
        try:
            settings = load_settings(path)
            triggers = check_jobs(settings)
        except CachewardenError as exc:
            log.error("reload_failed", error=str(exc), kept=[j[5:] for j in self.warm_jobs])
            return
        for job_id in self.warm_jobs:
            self.scheduler.remove_job(job_id)
        for retry in self.scheduler.get_jobs():
            if retry.id.startswith(RETRY_PREFIX):  # its context closes below
                retry.remove()
        self.warm_jobs = []
        old = self.context
        self.settings = settings
        self.context = Context.build(settings)
        self.client = task_client(settings)
        self._add_warming(settings, triggers)
        self._catch_up()
        old.close()
        log.info("reloaded", jobs=[j[5:] for j in self.warm_jobs])

    def run(self, path: str | None) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads."""
        stop = threading.Event()
        hup = threading.Event()

        def on_stop(_signum: int, _frame: FrameType | None) -> None:
            stop.set()

        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            hup.set()
            stop.set()  # wake the loop

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        self.start()
        try:
            while True:
                stop.wait()
                if hup.is_set():
                    hup.clear()
                    stop.clear()
                    self.reload(path)
                    continue
                break
        finally:
            self.close()

    def start(self) -> None:
        """Start APScheduler's thread, then fire what fell due before it (`_catch_up`)."""
        self.scheduler.start()
        self._catch_up()
        log.info(
            "scheduler_started", name=self.name, jobs=[j.id for j in self.scheduler.get_jobs()]
        )

    def close(self) -> None:
        """Stop APScheduler (a fire under way finishes on its own) and the context."""
        self.scheduler.shutdown(wait=False)
        self.context.close()
        log.info("scheduler_stopped", name=self.name)


def _described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def build_scheduler(settings: Settings) -> SchedulerProcess:
    """A scheduler for `settings`; ConfigError when a warming job's schedule is invalid."""
    return SchedulerProcess(settings)


def run_scheduler(settings: Settings, path: str | Path | None = None) -> None:
    """Run a scheduler until SIGTERM or SIGINT."""
    build_scheduler(settings).run(None if path is None else str(path))
