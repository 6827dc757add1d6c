"""Write-behind through a database outage: a private PostgreSQL stopped under load."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachewarden.writebehind.deadletters import count_dead
from tests.conftest import Harness
from tests.helpers import wait_for
from tests.servers import PrivatePostgres

KEYS = 3_000
SHARDS = 4
BEFORE_S = 5.0
OUTAGE_S = 20.0
AFTER_S = 5.0
USER = {"table": "users", "key": "id", "ttl": "10m"}
WRITE_BEHIND = {
    "max_delay": "100ms",
    "shards": SHARDS,
    "retry_base": "200ms",
    "retry_max": "3s",
}


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL server the test may stop; always stopped afterwards."""
    with PrivatePostgres() as pg:
        yield pg


@pytest.fixture
def outage_harness(tmp_path: Path, private_pg: PrivatePostgres, prefix: str) -> Iterator[Harness]:
    """A harness whose database is the private PostgreSQL."""
    h = Harness(tmp_path, private_pg.url, prefix)
    yield h
    h.close()


class Producer(threading.Thread):
    """Writes increasing values over KEYS keys, throttled, until stopped."""

    def __init__(self, h: Harness) -> None:
        super().__init__(name="producer", daemon=True)
        self.h = h
        self.stop_event = threading.Event()
        self.last: dict[int, str] = {}
        self.writes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                for _ in range(100):
                    key = self.writes % KEYS
                    value = f"v{self.writes}"
                    self.h.cache.write("user", key, {"name": value})
                    self.last[key] = value
                    self.writes += 1
                self.stop_event.wait(0.05)
        except BaseException as exc:
            self.error = exc


def _retry_counters(h: Harness) -> list[int]:
    """The consecutive-failure counter of each shard."""
    return [int(h.cache.redis.get(h.cache.keys.retries("user", s)) or 0) for s in range(SHARDS)]


def _flush_failures(output: str) -> list[dict[str, object]]:
    """The worker's "flush_failed" log events (JSON lines)."""
    events = []
    for line in output.splitlines():
        start = line.find("{")
        if start < 0 or "flush_failed" not in line:
            continue
        try:
            event = json.loads(line[start:])
        except ValueError:
            continue
        if event.get("event") == "flush_failed":
            events.append(event)
    return events


@pytest.mark.soak  # a run of 20 s or more under load: .ci/run runs it after make test
def test_database_outage_under_load_loses_nothing(
    outage_harness: Harness, private_pg: PrivatePostgres
) -> None:
    """With the database stopped for 20 s under continuous writes, every write lands once it is
    back, the flusher backs off meanwhile, and nothing is dead-lettered."""
    h = outage_harness
    h.create_table("users", version=False)
    h.configure({"user": USER}, {"user": WRITE_BEHIND})
    worker = h.worker(concurrency=2)
    producer = Producer(h)
    producer.start()
    try:
        time.sleep(BEFORE_S)
        wait_for(lambda: h.count("users") > 0, 30, what="the first flushes before the outage")
        h.engine.dispose()
        private_pg.stop()
        down_at = time.monotonic()
        highest_retry = 0
        while time.monotonic() - down_at < OUTAGE_S:
            highest_retry = max(highest_retry, *_retry_counters(h))
            time.sleep(0.2)
        writes_during_outage = producer.writes
        private_pg.start()
        time.sleep(AFTER_S)
    finally:
        producer.stop_event.set()
        producer.join(30)
    assert producer.error is None, producer.error
    assert producer.writes > writes_during_outage > 0

    wait_for(lambda: h.buffered() == 0, 120, what="the buffer to drain after the outage")
    rows = h.rows("users")
    assert len(rows) == KEYS == len(producer.last)
    assert {k: r["name"] for k, r in rows.items()} == producer.last

    assert count_dead(h.cache.redis, h.cache.keys, "user") == 0, "an outage must not dead-letter"
    failures = _flush_failures(worker.output())
    assert failures, "the flusher never reported the outage"
    delays = [int(str(e["retry_in_ms"])) for e in failures]
    # Backoff: the retry counter climbs, the delays reach the cap's window (retry_max 3 s, drawn
    # in [1.5 s, 3 s]) and the failed attempts stay few (a retry loop without backoff makes
    # a thousand in 20 s); no flush task crashes on the outage.
    assert highest_retry >= 3, highest_retry
    assert max(delays) >= 1500, delays
    assert len(failures) <= SHARDS * 40, len(failures)
    assert "raised unexpected" not in worker.output()
    assert _retry_counters(h) == [0] * SHARDS


def test_lock_wait_timeout_is_retried_not_dead_lettered(tmp_path: Path, prefix: str) -> None:
    """A write whose row stays locked past lock_wait is left pending (retried later), never sent to dead letters."""
    import sqlalchemy as sa

    from cachewarden.writebehind.flush import flush_shard
    from tests.conftest import _mariadb_database

    databases = _mariadb_database(f"{prefix}lk")
    url = next(databases)
    h = Harness(tmp_path, url, prefix)
    blocker = sa.create_engine(url)
    try:
        h.create_table("users", version=False)
        # The flusher's statements give up on a row lock after lock_wait (1 s).
        h.configure(
            {"user": {"table": "users", "key": "id", "ttl": "1m"}},
            {"user": {"shards": 1, "retry_base": "100ms", "lock_wait": "1s"}},
        )
        h.cache.write("user", 1, {"name": "first"})
        assert flush_shard(h.context, "user", 0).status == "done"
        h.cache.write("user", 1, {"name": "second"})
        with blocker.connect() as conn:
            conn.execute(sa.text("SELECT * FROM users WHERE id = 1 FOR UPDATE"))
            result = flush_shard(h.context, "user", 0)
            conn.rollback()
        assert (result.status, result.locked, result.retry_in_ms) == ("done", 1, 1000), result
        assert h.cache.redis.xlen(h.cache.keys.dead("user")) == 0
        assert h.rows("users")[1]["name"] == "first"  # held, not applied
        assert flush_shard(h.context, "user", 0).status == "done"
        assert h.rows("users")[1]["name"] == "second"
    finally:
        blocker.dispose()
        h.close()
        next(databases, None)
