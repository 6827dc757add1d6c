"""Write-behind end to end: application writes, a real Celery worker, a real database."""

from __future__ import annotations

import threading

from tests.conftest import Harness
from tests.helpers import wait_for

KEYS = 10_000
WRITES = 100_000
THREADS = 4

USER = {"table": "users", "key": "id", "ttl": "10m"}


def _drained(h: Harness) -> bool:
    """True when no write is left in any shard's stream."""
    assert h.settings is not None
    spec = h.settings.entities["user"]
    keys = h.cache.keys
    return all(
        h.cache.redis.xlen(keys.stream("user", s)) == 0 for s in range(spec.write_behind.shards)
    )


def test_concurrent_writes_end_as_last_values(harness: Harness) -> None:
    """100,000 writes over 10,000 keys from 4 threads leave exactly 10,000 rows, each its key's last value."""
    harness.create_table("users", version=False)
    harness.configure({"user": USER}, {"user": {"max_delay": "200ms"}})
    harness.worker(concurrency=2)
    last: dict[int, str] = {}

    def produce(thread: int) -> None:
        for i in range(thread, WRITES, THREADS):
            # Each key is written by one thread only, so "last" is well defined.
            key = (i // THREADS) % (KEYS // THREADS) * THREADS + thread
            harness.cache.write("user", key, {"name": f"v{i}"})
            last[key] = f"v{i}"

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(last) == KEYS
    wait_for(lambda: _drained(harness), 180, what="the buffer to drain")
    rows = harness.rows("users")
    assert len(rows) == KEYS
    assert {k: r["name"] for k, r in rows.items()} == last
