"""When warming jobs are due, and firing each due time once across every scheduler.

Worker side (APScheduler). A job's due times (slots) are what its schedule
defines, never when a scheduler noticed them: a `cron` job's are its
crontab's times in its time zone (daylight-saving gaps and repeats handled as
APScheduler's CronTrigger does); an `every` job's are multiples of the interval
since the Unix epoch, so every replica computes the same ones.

A scheduler that wakes for a job computes the slot as the latest due time up to
its own clock and claims it in Redis (`slot_claim.lua`): the first claim of a
slot wins, and no slot at or before the last claimed one can be claimed again.
So any number of schedulers fire each slot once, even with clocks a second or
two apart; a replica whose clock runs ahead fires a little early, one that runs
behind finds the slot taken.

A claimed slot whose run cannot be sent (the broker is down) is given back
(`slot_release.lua`): the record returns to the claim before it, and the
scheduler tries again (`catch_up`) within the slot's grace; until then any
scheduler's catch-up may claim it, still once.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from zoneinfo import ZoneInfo

import structlog
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from redis.exceptions import RedisError

from cachewarden.context import Context
from cachewarden.errors import ConfigError
from cachewarden.settings import Settings, WarmingJob
from cachewarden.warming.run import warm_scripts

log = structlog.get_logger("cachewarden.schedule")

UTC = datetime.UTC
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)
HOUR_MS = 3_600_000
Moment = datetime.datetime

# send(job, slot_ms): hand a due run to the workers
SendWarm = Callable[[str, int], None]


def trigger_for(job: WarmingJob, source: str = "config") -> BaseTrigger:
    """The job's APScheduler trigger; ConfigError naming the field when it is invalid."""
    if job.cron is not None:
        try:
            return CronTrigger.from_crontab(job.cron, timezone=ZoneInfo(job.timezone))
        except ValueError as exc:
            raise ConfigError(source, f"warming.{job.name}.cron", f"{job.cron!r}: {exc}") from None
    seconds = (job.every_ms or 0) / 1000
    return IntervalTrigger(seconds=seconds, start_date=EPOCH, timezone=UTC)


def check_jobs(settings: Settings) -> dict[str, BaseTrigger]:
    """Every job's trigger; ConfigError for the first job whose schedule is invalid."""
    return {name: trigger_for(job, settings.source) for name, job in settings.warming.items()}


def next_slot(trigger: BaseTrigger, now: datetime.datetime) -> datetime.datetime | None:
    """The first due time after `now` (in UTC).

    Asked in UTC: APScheduler 3's CronTrigger, asked with a local time inside a
    daylight-saving fold, can answer an earlier time than it was asked for.
    """
    now = now.astimezone(UTC)
    found: datetime.datetime | None = trigger.get_next_fire_time(None, now)
    if found is not None and found <= now:
        found = trigger.get_next_fire_time(found, now + datetime.timedelta(microseconds=1))
    # In UTC: Python never finds a local time inside a fold equal to one in another zone.
    return None if found is None else found.astimezone(UTC)


def period_ms(trigger: BaseTrigger, now: datetime.datetime) -> int:
    """The time between the job's next two due times (its interval, for a cron job the
    current one)."""
    first = next_slot(trigger, now)
    second = None if first is None else next_slot(trigger, first)
    if first is None or second is None:
        return HOUR_MS
    return int((second - first).total_seconds() * 1000)


def latest_slot(trigger: BaseTrigger, now: datetime.datetime) -> datetime.datetime | None:
    """The latest due time at or before `now`, in UTC (None when none in two periods)."""
    if isinstance(trigger, IntervalTrigger):
        step = trigger.interval_length
        return EPOCH + datetime.timedelta(seconds=(now - EPOCH).total_seconds() // step * step)
    now = now.astimezone(UTC)
    back = 2 * period_ms(trigger, now)
    start = now - datetime.timedelta(milliseconds=back)
    found: datetime.datetime | None = None
    at: datetime.datetime | None = trigger.get_next_fire_time(None, start)
    at = None if at is None else at.astimezone(UTC)
    while at is not None and at <= now:
        found = at
        at = next_slot(trigger, at)
    return found


def grace_ms(job: WarmingJob, trigger: BaseTrigger, now: datetime.datetime) -> int:
    """How late a due time may still fire: `misfire_grace`, else one period (at most 1 h)."""
    if job.misfire_grace_ms is not None:
        return job.misfire_grace_ms
    return min(period_ms(trigger, now), HOUR_MS)


def to_ms(at: datetime.datetime) -> int:
    """A due time as whole milliseconds since the epoch."""
    return round(at.timestamp() * 1000)


class Firer:
    """Claims a job's due times for this scheduler and sends the runs it claimed."""

    def __init__(self, context: Context, send: SendWarm, name: str) -> None:
        self.context = context
        self.send = send
        self.name = name

    def fire(self, job: WarmingJob, trigger: BaseTrigger, now: Moment | None = None) -> bool:
        """Fire the job's latest due time unless another scheduler did: True when sent."""
        now = now or datetime.datetime.now(UTC)
        slot = latest_slot(trigger, now)
        if slot is None:
            return False
        return self._claim(job, slot, now, missed=False)

    def catch_up(self, job: WarmingJob, trigger: BaseTrigger, now: Moment | None = None) -> str:
        """At start: fire the latest due time if no scheduler did and it is within the
        misfire grace; record it missed when it is older. Returns what it did."""
        now = now or datetime.datetime.now(UTC)
        slot = latest_slot(trigger, now)
        if slot is None:
            return "none"
        late = (now - slot).total_seconds() * 1000
        missed = late > grace_ms(job, trigger, now)
        if not self._claim(job, slot, now, missed=missed):
            return "taken"
        return "missed" if missed else "fired"

    def _claim(
        self, job: WarmingJob, slot: datetime.datetime, now: datetime.datetime, missed: bool
    ) -> bool:
        scripts = warm_scripts(self.context, job)
        slot_ms = to_ms(slot)
        if not scripts.slot_claim(slot_ms, to_ms(now), self.name, missed):
            return False
        if missed:
            log.warning("warm_slot_missed", job=job.name, slot=slot.isoformat())
            return True
        try:
            self.context.replicate(f"warming job {job.name!r}: the claim of {slot.isoformat()}")
            self.send(job.name, slot_ms)
        except Exception as exc:  # the broker, whatever its client raises: give it back
            self._give_back(job, slot, exc)
            raise
        log.info("warm_slot_fired", job=job.name, slot=slot.isoformat())
        return True

    def _give_back(self, job: WarmingJob, slot: datetime.datetime, exc: Exception) -> None:
        """Release the claim of a due time whose run was not sent, so that a retry (or any
        scheduler's catch-up) within its grace can fire it."""
        error = f"{type(exc).__name__}: {exc}"
        try:
            released = warm_scripts(self.context, job).slot_release(to_ms(slot), self.name, error)
        except RedisError as redis_exc:
            log.error(
                "warm_slot_lost",
                job=job.name,
                slot=slot.isoformat(),
                error=error,
                release_error=str(redis_exc),
            )
            return
        log.error(
            "warm_send_failed",
            job=job.name,
            slot=slot.isoformat(),
            error=error,
            given_back=released,
        )
