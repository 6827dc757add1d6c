"""Writes of some of a row's columns, on PostgreSQL, MariaDB and SQLite (issue 19).

The database keeps the columns a write leaves out, so the cache must too: a partial
write merges into the cached row, a read with no row cached gets the database row
with the written columns applied (never the written columns alone), and two partial
writes of one key in one batch both land. Flushes are driven in-process.
"""

from __future__ import annotations

import threading
from typing import Any

from cachewarden.codec import decode_row
from cachewarden.writebehind.deadletters import list_dead
from cachewarden.writebehind.flush import flush_shard
from tests.conftest import Harness

USER: dict[str, Any] = {"table": "users", "key": "id", "ttl": "10m"}


def _setup(h: Harness) -> None:
    # Nullable columns: the upsert's INSERT of a partial row needs no value for them
    # (a NOT NULL column a write leaves out makes the database refuse that write).
    with h.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name VARCHAR(200), email VARCHAR(200))"
        )
    h.configure({"user": USER}, {"user": {"shards": 1, "max_delay": "1h"}})


def _flush(h: Harness) -> None:
    assert flush_shard(h.context, "user", 0).status == "done"


def _entry(h: Harness, key: int) -> Any:
    text = h.cache.redis.get(h.cache.keys.entry("user", str(key)))
    return None if text is None else decode_row(text)


def test_a_partial_write_merges_into_the_cached_row(harness: Harness) -> None:
    """A write of one column over a cached row leaves the row's other columns in the cache at once, and the database ends with both."""
    h = harness
    _setup(h)
    h.cache.write("user", 1, {"name": "Ada", "email": "ada@old"})
    _flush(h)
    h.cache.write("user", 1, {"email": "ada@new"})
    assert h.cache.get("user", 1) == {"id": 1, "name": "Ada", "email": "ada@new"}
    _flush(h)
    assert h.rows("users") == {1: {"id": 1, "name": "Ada", "email": "ada@new"}}
    assert h.cache.get("user", 1) == {"id": 1, "name": "Ada", "email": "ada@new"}


def test_a_partial_write_with_no_row_cached_is_never_served_alone(harness: Harness) -> None:
    """With no row cached, a write of one column leaves no entry to serve (the written column alone would be a wrong row); a read meanwhile waits for the flush and gets the database row with that column applied."""
    h = harness
    _setup(h)
    with h.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO users (id, name, email) VALUES (1, 'Ada', 'ada@old')")
    h.cache.write("user", 1, {"email": "ada@new"})
    assert _entry(h, 1) is None  # not the partial row
    flusher = threading.Timer(0.3, lambda: _flush(h))
    flusher.start()
    try:
        assert h.cache.get("user", 1) == {"id": 1, "name": "Ada", "email": "ada@new"}
    finally:
        flusher.join()
    assert h.rows("users") == {1: {"id": 1, "name": "Ada", "email": "ada@new"}}


def test_two_partial_writes_of_a_key_in_one_batch_both_land(harness: Harness) -> None:
    """Two writes of different columns of one key, coalesced in one batch, both reach the database (the later one takes the earlier one's columns with it)."""
    h = harness
    _setup(h)
    with h.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO users (id, name, email) VALUES (1, 'Ada', 'ada@old')")
    h.cache.write("user", 1, {"name": "Ada L."})
    h.cache.write("user", 1, {"email": "ada@new"})
    assert h.buffered() == 2
    _flush(h)
    assert h.rows("users") == {1: {"id": 1, "name": "Ada L.", "email": "ada@new"}}
    assert h.cache.get("user", 1) == {"id": 1, "name": "Ada L.", "email": "ada@new"}


def test_a_merge_keeps_numbers_exactly_as_written(pg_harness: Harness) -> None:
    """Merging a partial write into a cached row keeps a 64-bit integer and a long decimal of the cached row digit for digit (nothing goes through a float)."""
    h = pg_harness
    h.create_table("users", version=False, extra="big BIGINT, price NUMERIC(30, 10)")
    h.configure({"user": USER}, {"user": {"shards": 1, "max_delay": "1h"}})  # name NOT NULL
    h.cache.write(
        "user",
        1,
        {"name": "Ada", "big": 9007199254740993, "price": "12345678901234567890.0123456789"},
    )
    h.cache.write("user", 1, {"name": "Ada L."})
    raw = h.cache.redis.get(h.cache.keys.entry("user", "1")) or ""
    assert "9007199254740993" in raw and "12345678901234567890.0123456789" in raw
    _flush(h)
    row = h.rows("users")[1]
    assert row["big"] == 9007199254740993 and row["name"] == "Ada L."


def test_a_key_with_a_partial_write_among_others_is_applied_in_turn(harness: Harness) -> None:
    """In one batch, a delete then a partial write leaves the row with the partial write's columns only, and a refused write before or after a partial write is a dead letter while the partial write's own columns land and the cache serves what the database holds."""
    h = harness
    with h.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name VARCHAR(200), "
            "email VARCHAR(200), CONSTRAINT no_poison CHECK (name <> 'poison'))"
        )
        conn.exec_driver_sql(
            "INSERT INTO users (id, name, email) VALUES (1, 'Ada', 'ada@old'), "
            "(2, 'Bob', 'bob@old'), (3, 'Cy', 'cy@old')"
        )
    h.configure({"user": USER}, {"user": {"shards": 1, "max_delay": "1h"}})
    h.cache.delete("user", 1)
    h.cache.write("user", 1, {"email": "ada@new"})
    h.cache.write("user", 2, {"name": "poison", "email": "bob@bad"})
    h.cache.write("user", 2, {"email": "bob@new"})
    h.cache.write("user", 3, {"email": "cy@new"})
    h.cache.write("user", 3, {"name": "poison", "email": "cy@bad"})
    _flush(h)
    assert h.rows("users") == {
        1: {"id": 1, "name": None, "email": "ada@new"},
        2: {"id": 2, "name": "Bob", "email": "bob@new"},
        3: {"id": 3, "name": "Cy", "email": "cy@new"},
    }
    for key, row in h.rows("users").items():
        assert h.cache.get("user", key) == row
    letters = list_dead(h.cache.redis, h.cache.keys, "user")
    assert sorted(x.key for x in letters) == ["2", "3"]
