"""Due times: the same slots on every replica, each claimed once in Redis, missed ones recorded."""

from __future__ import annotations

import base64
import datetime
import json
import time
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis

from cachewarden.context import Context
from cachewarden.errors import ConfigError
from cachewarden.operator.scheduler import SchedulerProcess
from cachewarden.settings import Settings, load_settings
from cachewarden.warming.schedule import Firer, check_jobs, latest_slot, next_slot, trigger_for
from tests.conftest import Harness
from tests.helpers import render_config, wait_for
from tests.servers import PrivateRedis

UTC = datetime.UTC


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


def configure(h: Harness, **job: Any) -> Context:
    h.configure(
        {"user": {"table": "users", "key": "id", "ttl": "10m"}},
        warming={"j": {"entity": "user", **job}},
    )
    return h.context


def test_interval_slots_are_anchored_at_the_epoch() -> None:
    """Two replicas started at different moments compute the same `every` slots: multiples of the interval since the epoch."""
    from cachewarden.settings import WarmingJob

    trigger = trigger_for(WarmingJob("j", "user", None, None, 2000))
    assert latest_slot(trigger, at("2026-12-02 10:00:03.9")) == at("2026-12-02 10:00:02")
    assert latest_slot(trigger, at("2026-12-02 10:00:02")) == at("2026-12-02 10:00:02")
    assert next_slot(trigger, at("2026-12-02 10:00:02")) == at("2026-12-02 10:00:04")


def test_cron_slots_follow_the_time_zone_through_daylight_saving() -> None:
    """A daily 02:30 Europe/Berlin cron: skipped by spring-forward it fires once at 01:30 UTC, repeated by fall-back it fires once in each offset, as APScheduler's CronTrigger defines."""
    from cachewarden.settings import WarmingJob

    job = WarmingJob("j", "user", None, "30 2 * * *", None, timezone="Europe/Berlin")
    trigger = trigger_for(job)
    slots, now = [], at("2026-03-28 00:00")
    for _ in range(3):
        found = next_slot(trigger, now)
        assert found is not None
        slots.append(found)
        now = found
    assert slots == [at("2026-03-28 01:30"), at("2026-03-29 01:30"), at("2026-03-30 00:30")]
    fall, now = [], at("2026-10-24 12:00")
    for _ in range(3):
        found = next_slot(trigger, now)
        assert found is not None
        fall.append(found)
        now = found
    assert fall == [at("2026-10-25 00:30"), at("2026-10-25 01:30"), at("2026-10-26 01:30")]
    berlin = ZoneInfo("Europe/Berlin")
    second = datetime.datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=berlin)  # 02:30 CET
    assert latest_slot(trigger, at("2026-10-25 01:45")) == second.astimezone(UTC)


def test_a_cron_string_apscheduler_refuses_is_a_config_error(tmp_path: Any) -> None:
    """A cron field out of range fails the job's check with an error naming the job's field."""
    path = tmp_path / "c.toml"
    path.write_text(
        render_config(
            {
                "entities.user": {"table": "users", "key": "id", "ttl": "10m"},
                "warming.bad": {"entity": "user", "cron": "61 * * * *"},
            }
        )
    )
    with pytest.raises(ConfigError, match=r"warming\.bad\.cron.*61"):
        check_jobs(load_settings(path))


def test_each_slot_is_claimed_once_across_replicas_with_skewed_clocks(harness: Harness) -> None:
    """Three replicas, one 1.5 s ahead and one 1.5 s behind, firing every 2 s slot over 20 s: each slot is sent exactly once."""
    context = configure(harness, every="2s")
    job = context.settings.job("j")
    trigger = check_jobs(context.settings)["j"]
    sent: list[tuple[str, int]] = []
    replicas = {
        skew: Firer(context, lambda name, slot, s=skew: sent.append((s, slot)), f"r{skew}")
        for skew in (-1.5, 0.0, 1.5)
    }
    start = at("2026-12-02 10:00:00")
    # Each replica wakes at every slot of its own clock, in true-time order.
    wakes = sorted(
        (true, skew)
        for skew in replicas
        for true in (start + datetime.timedelta(seconds=2 * n - skew) for n in range(10))
    )
    for true, skew in wakes:
        replicas[skew].fire(job, trigger, true + datetime.timedelta(seconds=skew))
    slots = [slot for _, slot in sent]
    assert len(slots) == len(set(slots)) == 10
    assert {skew for skew, _ in sent} == {1.5}  # the replica ahead always got there first


def test_a_slot_within_grace_fires_on_start_and_an_older_one_is_recorded_missed(
    harness: Harness,
) -> None:
    """At start, an unfired slot 20 s old fires (grace 30 s); with grace 10 s it is recorded as missed and not sent; a fired one is left alone."""
    sent: list[int] = []
    context = configure(harness, every="1m", misfire_grace="30s")
    job = context.settings.job("j")
    trigger = check_jobs(context.settings)["j"]
    firer = Firer(context, lambda name, slot: sent.append(slot), "r")
    assert firer.catch_up(job, trigger, at("2026-12-02 10:00:20")) == "fired"
    assert firer.catch_up(job, trigger, at("2026-12-02 10:00:25")) == "taken"
    assert sent == [int(at("2026-12-02 10:00:00").timestamp() * 1000)]

    context = configure(harness, every="1m", misfire_grace="10s")
    job = context.settings.job("j")
    firer = Firer(context, lambda name, slot: sent.append(slot), "r")
    assert firer.catch_up(job, trigger, at("2026-12-02 10:01:20")) == "missed"
    assert len(sent) == 1
    record = context.redis.hgetall(context.keys.job("j"))
    assert record["missed"] == "1" and record["fired"] == "1"


class _RecordingScheduler(SchedulerProcess):
    """A real scheduler (APScheduler, slot claims in Redis) that records each run it
    sends instead of sending it to the broker."""

    def __init__(self, settings: Settings) -> None:
        self.sent: list[int] = []
        super().__init__(settings)

    def _send_warm(self, job: str, slot_ms: int) -> None:
        self.sent.append(slot_ms)


def test_a_slot_due_between_building_the_scheduler_and_starting_it_fires(
    pg_harness: Harness,
) -> None:
    """A 2 s slot that falls due after the scheduler was built and before it started fires at the start, and the next one from APScheduler, none skipped."""
    context = configure(pg_harness, every="2s")
    scheduler = _RecordingScheduler(context.settings)
    try:
        built = time.time()
        slot = (int(built) // 2 + 1) * 2  # the first slot after the build, in seconds
        wait_for(lambda: time.time() >= slot + 0.1, 5, what="the next slot to fall due")
        scheduler.start()
        wait_for(lambda: len(scheduler.sent) >= 2, 10, what="two runs sent")
    finally:
        scheduler.close()
    assert scheduler.sent[:2] == [slot * 1000, (slot + 2) * 1000]


def _queued_slots(broker: PrivateRedis, queue: str) -> list[int]:
    """The due times of the warm tasks waiting in `queue` on the broker."""
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    try:
        messages = client.lrange(queue, 0, -1)
    finally:
        client.close()
    slots = []
    for raw in messages:
        args, _, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
        slots.append(int(args[1]))
    return slots


def test_a_due_time_fired_while_the_broker_is_down_is_sent_once_it_is_back(
    pg_harness: Harness,
) -> None:
    """A due time whose warm task the broker refused is given back, and a scheduler sends it exactly once when the broker answers again."""
    harness = pg_harness
    with PrivateRedis() as broker:
        configure(harness, every="5s", misfire_grace="30s")
        text = harness.config_path.read_text()
        queue = f'queue = "{harness.queue}"'
        harness.config_path.write_text(text.replace(queue, f'{queue}\nbroker_url = "{broker.url}"'))
        settings = harness.configure_from_file()
        keys, client = harness.context.keys, harness.context.redis
        broker.stop()
        # Just after a due time, so the next one is seconds away: the catch-up at start
        # fires this one.
        wait_for(lambda: 0.1 <= time.time() % 5 <= 1.0, 10, interval=0.01, what="a due time")
        slot = int(time.time()) // 5 * 5 * 1000
        scheduler = SchedulerProcess(settings)
        try:
            scheduler.start()
            record = client.hgetall(keys.job("j"))
            assert record["unsent_slot"] == str(slot) and "slot" not in record, record
            assert "OperationalError" in record["unsent_error"]
            broker.start()
            warming = settings.queue("warming")
            wait_for(lambda: slot in _queued_slots(broker, warming), 15, what="the run sent")
        finally:
            scheduler.close()
        assert _queued_slots(broker, warming).count(slot) == 1
        record = client.hgetall(keys.job("j"))
        assert int(record["slot"]) >= slot and record["unsent"] == "1"
