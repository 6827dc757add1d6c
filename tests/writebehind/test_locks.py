"""A row an application transaction holds locked delays only itself: the rest of its batch lands."""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa

from tests.conftest import Harness
from tests.helpers import wait_for

KEYS = range(1, 101)
LOCKED = 50
HOLD_S = 20.0
MAX_DELAY_S = 1.0


def test_a_locked_row_delays_only_itself(server_harness: Harness) -> None:
    """While an application transaction holds one row locked for 20 s, the other 99 keys of its shard land within max_delay + 2 s and the locked one within 2 s of the release, with no dead letter."""
    h = server_harness
    h.create_table("users", version=False)
    with h.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO users (id, name) VALUES (:k, 'old')"), [{"k": k} for k in KEYS]
        )
    h.configure(
        {"user": {"table": "users", "key": "id", "ttl": "10m"}},
        {"user": {"shards": 1, "max_delay": "1s", "lock_wait": "500ms"}},
    )
    h.worker(concurrency=1)
    locked = threading.Event()
    release = threading.Event()

    def application() -> None:
        with h.engine.connect() as conn:
            conn.begin()
            conn.execute(sa.text("UPDATE users SET name = 'app' WHERE id = :k"), {"k": LOCKED})
            locked.set()
            release.wait(HOLD_S + 30)
            conn.rollback()

    holder = threading.Thread(target=application)
    holder.start()
    try:
        assert locked.wait(10)
        started = time.monotonic()
        h.cache.write_many("user", {k: {"name": "new"} for k in KEYS})

        def others_landed() -> bool:
            rows = h.rows("users")
            return all(rows[k]["name"] == "new" for k in KEYS if k != LOCKED)

        wait_for(others_landed, MAX_DELAY_S + 2, interval=0.05, what="the 99 unlocked rows")
        assert time.monotonic() - started <= MAX_DELAY_S + 2
        assert h.rows("users")[LOCKED]["name"] == "old"  # the lock really held it back
        time.sleep(max(0.0, HOLD_S - (time.monotonic() - started)))  # the lock is held 20 s
        assert h.rows("users")[LOCKED]["name"] == "old"
    finally:
        release.set()
        holder.join()
    released = time.monotonic()
    wait_for(lambda: h.rows("users")[LOCKED]["name"] == "new", 2, interval=0.05, what="row 50")
    assert time.monotonic() - released <= 2
    assert h.cache.redis.xlen(h.cache.keys.dead("user")) == 0
