"""Warming with real processes: schedulers (three at once, one clock ahead), workers, Flower, the CLI."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cachewarden.keys import Keyspace
from tests.conftest import Harness
from tests.helpers import (
    REPO,
    FlowerProcess,
    SchedulerProcess,
    WorkerProcess,
    render_config,
    wait_for,
)
from tests.warming.test_run import entries, fill_table

USER = {"table": "users", "key": "id", "ttl": "10m"}
# A run that takes 2.5 s: with a due time every 2 s, the next one comes while it lives.
# An advisory lock taken in the query counts, in the database, runs that overlapped.
SLOW = (
    "SELECT id, name, (SELECT CASE WHEN pg_try_advisory_xact_lock({lock}) "
    "THEN nextval('{seq}_ok') ELSE nextval('{seq}_overlap') END) AS mark, "
    "pg_sleep(2.5)::text AS slept FROM users"
)
FAST = "SELECT id, name, nextval('{seq}_ok') AS mark FROM users"


def history(h: Harness, job: str, keys: Keyspace | None = None) -> list[dict[str, Any]]:
    """The job's finished runs, oldest first."""
    keys = keys or h.context.keys
    raw = h.context.redis.lrange(keys.run_history(job), 0, -1)
    return [json.loads(r) for r in reversed(raw)]


def sequences(h: Harness, *names: str) -> None:
    with h.engine.begin() as conn:
        for name in names:
            conn.execute(sa.text(f"CREATE SEQUENCE {name}_ok"))
            conn.execute(sa.text(f"CREATE SEQUENCE {name}_overlap"))


def used(h: Harness, sequence: str) -> int:
    """How often the database handed out a value of `sequence`."""
    with h.engine.connect() as conn:
        row = conn.execute(sa.text(f"SELECT last_value, is_called FROM {sequence}")).one()
    return int(row[0]) if row[1] else 0


def _group(h: Harness, name: str) -> dict[str, Any]:
    seq = f"{name}_{h.prefix}"
    sequences(h, f"{seq}_fast", f"{seq}_slow")
    return {
        f"{name}_fast": {"entity": "user", "every": "2s", "query": FAST.format(seq=f"{seq}_fast")},
        f"{name}_slow": {
            "entity": "user",
            "every": "2s",
            "query": SLOW.format(seq=f"{seq}_slow", lock=abs(hash(seq)) % 2**31),
        },
    }


def _beside(h: Harness, jobs: dict[str, Any], tmp_path: Path) -> tuple[Path, Keyspace]:
    """A second config like the harness's, under a prefix and queue of its own, with `jobs`."""
    text = h.config_path.read_text()
    text = text.replace(f'prefix = "{h.prefix}"', f'prefix = "{h.prefix}b"')
    text = text.replace(f'queue = "{h.queue}"', f'queue = "{h.queue}b"')
    text = text.split("[warming.")[0] + render_config({f"warming.{k}": v for k, v in jobs.items()})
    path = tmp_path / "beside.toml"
    path.write_text(text)
    return path, Keyspace(f"{h.prefix}b")


def _check_runs(h: Harness, name: str, keys: Keyspace) -> None:
    """One job's runs after the schedulers stopped: see the test's docstring."""
    record = h.context.redis.hgetall(keys.job(name))
    runs = history(h, name, keys)
    fired = int(record["fired"])
    assert fired >= 9, (name, record)
    slots = [int(r["slot"]) for r in runs]
    assert len(slots) == len(set(slots)), (name, slots)
    seq = f"{name.split('_')[0]}_{h.prefix}_{name.split('_')[1]}"
    # One query per run in the database, one run per due time not dropped.
    assert used(h, f"{seq}_ok") == len(runs) == fired - _dropped(record), record
    if name.endswith("fast"):
        # Every due time ran once, in order: slots 2 s apart, but where the loaded
        # machine dropped one (refused beside a live run, or come after a newer).
        assert slots == sorted(slots) and all(s % 2000 == 0 for s in slots), slots
        if not _dropped(record):
            assert slots == list(range(slots[0], slots[0] + 2000 * fired, 2000)), slots
    else:
        # Due times came while a run lived: refused, never run beside it.
        assert int(record["overlaps"]) >= 3, (name, record)
        assert used(h, f"{seq}_overlap") == 0
        spans = [(int(r["started_ms"]), int(r["finished_ms"])) for r in runs]
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans


def _dropped(record: dict[str, str]) -> int:
    """Due times fired that made no run: refused beside a live run ("overlaps"), or whose
    task came after a newer due time had started ("repeats", on a loaded machine)."""
    return int(record.get("overlaps", 0)) + int(record.get("repeats", 0))


@pytest.mark.soak  # a run of 20 s or more under load: .ci/run runs it after make test
def test_three_schedulers_fire_each_due_time_once_and_runs_never_overlap(
    pg_harness: Harness, tmp_path: Path
) -> None:
    """Three schedulers, and beside them three more with one clock 1.5 s ahead, with `every = "2s"` for 20 s: each due time fires once, the database counts one query per run, and a 2.5 s run is never overlapped, though due times came while it ran."""
    h = pg_harness
    h.create_table("users", version=False)
    fill_table(h, 1)  # one row: each run evaluates the query's functions once
    plain, skewed = _group(h, "plain"), _group(h, "skewed")
    h.configure({"user": USER}, warming=plain)
    config_b, keys_b = _beside(h, skewed, tmp_path)
    h.worker(concurrency=2)
    worker_b = WorkerProcess(config_b, tmp_path / "worker-b.log", concurrency=2)
    h.workers.append(worker_b.start())
    schedulers = [SchedulerProcess(h.config_path, tmp_path / f"a{n}.log") for n in range(3)]
    schedulers += [
        SchedulerProcess(config_b, tmp_path / f"b{n}.log", offset)
        for n, offset in enumerate((0, 0, 1.5))
    ]
    for s in schedulers:
        s.wait_started()
    time.sleep(20)
    for s in schedulers:
        s.stop()
    redis = h.context.redis
    groups = [(h.context.keys, plain), (keys_b, skewed)]

    def settled() -> bool:
        """Every fired due time has run or been refused, and no run lives."""
        for keys, group in groups:
            for name in group:
                record = redis.hgetall(keys.job(name))
                ended = len(history(h, name, keys)) + _dropped(record)
                if redis.exists(keys.run_lock(name)) or ended != int(record["fired"]):
                    return False
        return True

    def records() -> str:
        return str({n: redis.hgetall(k.job(n)) for k, js in groups for n in js})

    try:
        wait_for(settled, 20, interval=0.2, what="every fired due time to run or be refused")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {records()}") from None

    for keys, group in groups:
        for name in group:
            _check_runs(h, name, keys)
    ahead = redis.hgetall(keys_b.job("skewed_fast"))
    assert ahead["slot_by"] == schedulers[-1].name  # the clock ahead fired first


def test_a_killed_scheduler_and_a_killed_run_holder_leave_the_next_due_time_to_the_others(
    pg_harness: Harness, tmp_path: Path
) -> None:
    """With `every = "2s"`: the scheduler that fired the last due time SIGKILLed, the next one fires on another scheduler within one interval; the worker running a run SIGKILLed, its lock expires and a new run starts on the other worker within seconds."""
    h = pg_harness
    h.create_table("users", version=False)
    fill_table(h, 3)
    h.configure(
        {"user": USER},
        warming={
            "tick": {"entity": "user", "every": "2s"},
            "long": {
                "entity": "user",
                "every": "2s",
                "query": "SELECT id, name, pg_sleep(30)::text AS s FROM users",
            },
        },
    )
    doomed_worker = h.worker(concurrency=1)
    schedulers = [SchedulerProcess(h.config_path, tmp_path / f"s{n}.log") for n in range(3)]
    for s in schedulers:
        s.wait_started()
    redis, keys = h.context.redis, h.context.keys
    wait_for(lambda: redis.hget(keys.job("tick"), "slot"), 10, what="a first due time")
    record = redis.hgetall(keys.job("tick"))
    victim = next(s for s in schedulers if s.name == record["slot_by"])
    victim.stop(signal.SIGKILL)
    killed_at = time.time() * 1000
    next_slot = (int(killed_at) // 2000 + 1) * 2000

    def fired_after() -> bool:
        return int(redis.hget(keys.job("tick"), "slot") or 0) >= next_slot

    wait_for(fired_after, 2.0 + 1.0, what="the next due time to fire")
    after = redis.hgetall(keys.job("tick"))
    assert int(after["slot"]) == next_slot and after["slot_by"] != victim.name

    # The long job's run holds its lock in the worker: kill that worker.
    wait_for(lambda: redis.get(keys.run_lock("long")), 10, what="a long run to start")
    first_run = int(redis.get(keys.run_lock("long")) or 0)
    doomed_worker.kill()
    h.worker(concurrency=2)
    started = time.monotonic()

    def newer_run() -> bool:
        return int(redis.get(keys.run_lock("long")) or 0) > first_run

    wait_for(newer_run, 15, what="a new run after the holder died")
    assert time.monotonic() - started < 5.0 + 2 * 2.0 + 3.0  # lock ttl + two intervals + start
    for s in schedulers:
        s.stop()
    for w in h.workers:
        w.kill()
    # The killed workers' sessions sleep on in PostgreSQL until they are told to stop.
    with h.engine.connect() as conn:
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()"
            )
        )


def test_a_failing_job_shows_its_error_everywhere_and_the_healthy_one_keeps_its_schedule(
    pg_harness: Harness, tmp_path: Path
) -> None:
    """A job whose SQL fails: its error is in the worker's log, in `cachewarden jobs` and as a FAILURE in Flower's API, while the healthy job beside it runs every due time."""
    h = pg_harness
    h.create_table("users", version=False)
    fill_table(h, 3)
    h.configure(
        {"user": USER},
        warming={
            "broken": {"entity": "user", "every": "2s", "query": "SELECT id FROM no_such_table"},
            "healthy": {"entity": "user", "every": "2s"},
        },
    )
    flower = FlowerProcess(h.config_path)
    try:
        worker = h.worker(concurrency=2)
        scheduler = SchedulerProcess(h.config_path, tmp_path / "s.log").wait_started()

        def failed_in_flower() -> list[dict[str, Any]]:
            return [
                t
                for t in flower.tasks("cachewarden.warm", "FAILURE")
                if "broken" in str(t.get("args"))
            ]

        failures = wait_for(failed_in_flower, 30, interval=0.5, what="Flower to list FAILURE")
        assert "WarmFailed" in failures[0]["exception"]
        assert "no_such_table" in failures[0]["exception"]
        time.sleep(6)
        scheduler.stop()
    finally:
        flower.stop()
    assert "no_such_table" in worker.output() and "warm_run_failed" in worker.output()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cachewarden.operator.cli",
            "--config",
            str(h.config_path),
            "jobs",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    rows = {r["job"]: r for r in json.loads(out.stdout)}
    assert rows["broken"]["outcome"] == "failed"
    assert "no_such_table" in rows["broken"]["run"]["error"]
    assert rows["healthy"]["outcome"] == "done"
    slots = [int(r["slot"]) for r in history(h, "healthy")]
    assert len(slots) >= 4 and slots == list(range(slots[0], slots[0] + 2000 * len(slots), 2000))


def test_warm_from_the_command_line_caches_100k_rows(harness: Harness) -> None:
    """`cachewarden warm JOB` with a worker warms a 100,000-row table: it exits 0, and every key holds its row with a TTL in its jittered range."""
    h = harness
    h.create_table("users", version=False)
    fill_table(h, 100_000)
    h.configure({"user": USER}, warming={"all": {"entity": "user", "cron": "0 3 * * *"}})
    h.worker(concurrency=2)
    env = {**os.environ, "CACHEWARDEN_CONFIG": str(h.config_path)}
    done = subprocess.run(
        [sys.executable, "-m", "cachewarden.operator.cli", "warm", "all"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "warmed 100,000 rows" in done.stderr
    found = entries(h)
    assert len(found) == 100_000
    assert all(row == {"id": int(k), "name": f"n{k}"} for k, (row, _) in found.items())
    assert all(0.9 * 600_000 - 120_000 <= pttl <= 600_000 for _, pttl in found.values())


def test_sighup_reloads_the_jobs_and_keeps_them_when_the_new_config_is_broken(
    pg_harness: Harness, tmp_path: Path
) -> None:
    """SIGHUP after a job was added to the config makes the scheduler fire it; SIGHUP with a config that does not load logs the error and the running jobs keep firing."""
    h = pg_harness
    h.create_table("users", version=False)
    every = {"entity": "user", "every": "1s"}
    h.configure({"user": USER}, warming={"a": every})
    scheduler = SchedulerProcess(h.config_path, tmp_path / "s.log").wait_started()
    redis, keys = h.context.redis, h.context.keys
    slot = lambda job: int(redis.hget(keys.job(job), "slot") or 0)  # noqa: E731
    try:
        wait_for(lambda: slot("a"), 5, what="job a to fire")
        assert slot("b") == 0
        h.configure({"user": USER}, warming={"a": every, "b": every})
        scheduler.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: slot("b"), 5, what="the added job b to fire")
        h.config_path.write_text(h.config_path.read_text() + "\n[warming.c]\nentity = 'nobody'\n")
        scheduler.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload_failed" in scheduler.output(), 5, what="the reload to fail")
        assert "unknown entity 'nobody'" in scheduler.output()
        after = slot("a")
        wait_for(lambda: slot("a") > after and slot("b") > after, 5, what="a and b to fire on")
    finally:
        scheduler.stop()


def test_an_idle_scheduler_and_worker_write_a_few_lines_not_a_line_per_dispatch(
    pg_harness: Harness, tmp_path: Path
) -> None:
    """At INFO, a scheduler (dispatching every 100 ms, with a warming job scheduled) and a worker, idle for 5 s after they started, write at most 2 log lines between them, none of them APScheduler's per-run lines."""
    h = pg_harness
    h.create_table("users")
    # A job whose due times never fall in the 5 s watched (a run logs as it should).
    yearly = {"entity": "user", "cron": "0 3 1 1 *"}
    h.configure({"user": USER}, dispatch_interval="100ms", warming={"j": yearly})
    worker = h.worker(concurrency=1)
    scheduler = SchedulerProcess(h.config_path, tmp_path / "scheduler.log").wait_started()
    try:
        wait_for(lambda: "ready." in worker.log_path.read_text(), 30, what="the worker")
        logs = (scheduler.log_path, worker.log_path)
        started = [len(log.read_text().splitlines()) for log in logs]
        time.sleep(5)
        idle = [
            line
            for log, n in zip(logs, started, strict=True)
            for line in log.read_text().splitlines()[n:]
        ]
    finally:
        scheduler.stop()
    assert len(idle) <= 2, idle
    assert not [line for line in idle if "apscheduler" in line], idle
