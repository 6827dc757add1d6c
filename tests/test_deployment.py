"""The processes the README tells a deployment to run: deadlines, failover, Flower."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests.conftest import Harness
from tests.helpers import REPO, FlowerProcess, wait_for

USER = {"table": "users", "key": "id", "ttl": "10m"}


def _landed(h: Harness, n: int) -> bool:
    return h.count("users") >= n


def test_a_lone_write_lands_within_max_delay(pg_harness: Harness) -> None:
    """A single write reaches the database about max_delay after it was made, not later."""
    pg_harness.create_table("users", version=False)
    pg_harness.configure({"user": USER}, {"user": {"max_delay": "300ms"}})
    pg_harness.worker(concurrency=1)
    started = time.monotonic()
    pg_harness.cache.write("user", 1, {"name": "ada"})
    wait_for(lambda: _landed(pg_harness, 1), 10, what="the write to land")
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"landed after {elapsed:.2f}s with max_delay 300ms"


def test_a_full_batch_flushes_before_its_deadline(pg_harness: Harness) -> None:
    """A shard holding batch_size writes is flushed at once, long before max_delay."""
    pg_harness.create_table("users", version=False)
    pg_harness.configure(
        {"user": USER}, {"user": {"max_delay": "60s", "batch_size": 100, "shards": 1}}
    )
    pg_harness.worker(concurrency=1)
    for key in range(100):
        pg_harness.cache.write("user", key, {"name": "x"})
    wait_for(lambda: _landed(pg_harness, 100), 15, what="the full batch to land")


def test_deadline_holds_with_one_of_two_workers_killed(pg_harness: Harness) -> None:
    """With two workers running and one SIGKILLed, writes keep landing through the other."""
    pg_harness.create_table("users", version=False)
    pg_harness.configure({"user": USER}, {"user": {"max_delay": "300ms", "lock_ttl": "2s"}})
    first = pg_harness.worker(concurrency=1)
    pg_harness.worker(concurrency=1)
    for key in range(200):
        pg_harness.cache.write("user", key, {"name": "before"})
    wait_for(lambda: _landed(pg_harness, 200), 15, what="writes before the kill")
    first.kill()
    started = time.monotonic()
    for key in range(200, 400):
        pg_harness.cache.write("user", key, {"name": "after"})
    wait_for(lambda: _landed(pg_harness, 400), 20, what="writes after the kill")
    assert time.monotonic() - started < 10


def test_scheduler_dispatches_when_workers_only_consume(pg_harness: Harness) -> None:
    """`cachewarden scheduler` dispatches flushes too, so either kind of process keeps the deadline."""
    pg_harness.create_table("users", version=False)
    pg_harness.configure({"user": USER}, {"user": {"max_delay": "300ms"}})
    env = {**os.environ, "CACHEWARDEN_CONFIG": str(pg_harness.config_path)}
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "cachewarden.operator.cli", "scheduler"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pg_harness.cache.write("user", 7, {"name": "x"})
        # The scheduler alone claims the due shard and sends the task; it waits in the queue.
        flushes = f"{pg_harness.queue}.writebehind"
        queue_len = lambda: pg_harness.cache.redis.llen(flushes)  # noqa: E731
        wait_for(queue_len, 10, what="the scheduler to send a flush task")
        pg_harness.worker(concurrency=1)
        wait_for(lambda: _landed(pg_harness, 1), 15, what="the write to land")
    finally:
        scheduler.terminate()
        scheduler.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def flower(pg_harness: Harness) -> Iterator[FlowerProcess]:
    """Flower (`celery -A worker flower`) with basic auth on a free loopback port."""
    pg_harness.create_table("users", version=False)
    pg_harness.configure({"user": USER}, {"user": {"max_delay": "200ms"}})
    proc = FlowerProcess(pg_harness.config_path)
    try:
        yield proc
    finally:
        proc.stop()


def _flush_tasks(flower: FlowerProcess, state: str) -> list[dict[str, object]]:
    """The cachewarden.flush tasks Flower lists in `state`."""
    return flower.tasks("cachewarden.flush", state)


def test_flower_shows_flush_tasks_behind_auth(pg_harness: Harness, flower: FlowerProcess) -> None:
    """Flower refuses anonymous users and shows the worker and its flush tasks to operators."""
    assert flower.status("/api/workers") == 401
    pg_harness.worker(concurrency=1)
    pg_harness.cache.write("user", 1, {"name": "x"})
    wait_for(lambda: _landed(pg_harness, 1), 15, what="the write to land")

    seen = wait_for(
        lambda: _flush_tasks(flower, "SUCCESS"), 20, what="Flower to list a finished flush task"
    )
    assert "user" in str(seen[0]["args"])

    def workers() -> object:
        found = flower.get("/api/workers?refresh=1")
        return isinstance(found, dict) and found

    wait_for(workers, 30, interval=1.0, what="Flower to list the worker")


def test_flower_shows_a_flush_during_a_database_outage_as_failed(
    pg_harness: Harness, flower: FlowerProcess
) -> None:
    """With the database unreachable, Flower lists the worker's flush tasks as FAILURE naming the database, and the write stays pending."""
    h = pg_harness
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{_free_port()}/test"
    h.configure({"user": USER}, {"user": {"max_delay": "200ms"}}, db_url=dead)
    h.worker(concurrency=1)
    h.cache.write("user", 1, {"name": "x"})

    seen = wait_for(
        lambda: _flush_tasks(flower, "FAILURE"), 30, what="Flower to list a failed flush task"
    )
    assert "FlushFailed" in str(seen[0]["exception"]) and "unavailable" in str(seen[0]["exception"])
    assert h.buffered("user") == 1


def test_flower_lists_flush_refresh_and_warm_tasks_with_arguments_and_outcomes(
    pg_harness: Harness,
) -> None:
    """A real Flower beside a real worker lists a flush (entity, shard, rows applied), a refresh (entity, keys) and a warm run (job, rows) as SUCCESS through its API, and refuses that API without credentials."""
    h = pg_harness
    h.create_table("users", version=False)
    with h.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id, name) VALUES (1, 'a'), (2, 'b')"))
    h.configure(
        {"user": {**USER, "ttl": "2s", "refresh_ahead": 0.5}},
        {"user": {"max_delay": "200ms"}},
        warming={"all": {"entity": "user", "every": "1h"}},
    )
    flower = FlowerProcess(h.config_path)
    try:
        assert flower.status("/api/tasks") == 401
        h.worker(concurrency=2)
        h.cache.write("user", 3, {"name": "c"})
        assert h.cache.get("user", 1) == {"id": 1, "name": "a"}  # a load: the key is hot
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "cachewarden.operator.cli",
                "--config",
                str(h.config_path),
                "warm",
                "all",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr

        def listed() -> dict[str, dict[str, object]] | None:
            h.cache.get("user", 1)  # read on: in its last second, a read asks for a refresh
            found = {}
            for name in ("cachewarden.flush", "cachewarden.refresh", "cachewarden.warm"):
                tasks = flower.tasks(name, "SUCCESS")
                if not tasks:
                    return None
                found[name] = tasks[0]
            return found

        seen = wait_for(listed, 30, interval=0.5, what="Flower to list all three")
    finally:
        flower.stop()
    flush, refresh, warm = (
        seen[n] for n in ("cachewarden.flush", "cachewarden.refresh", "cachewarden.warm")
    )
    assert "'user'" in str(flush["args"]) and "'applied'" in str(flush["result"])
    assert "'user'" in str(refresh["args"]) and "'1'" in str(refresh["args"])
    assert "'all'" in str(warm["args"]) and "'rows': 3" in str(warm["result"])
