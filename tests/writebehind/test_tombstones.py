"""Versioned deletes leave a tombstone: an older write after the delete never brings the row back."""

from __future__ import annotations

from cachewarden.writebehind.flush import flush_shard
from tests.conftest import Harness
from tests.helpers import wait_for

USER = {"table": "users", "key": "id", "ttl": "10m", "version_column": "version"}


def _setup(h: Harness, **entity: str) -> None:
    h.create_table("users")
    h.configure({"user": {**USER, **entity}}, {"user": {"shards": 1}})


def _flush(h: Harness) -> None:
    assert flush_shard(h.context, "user", 0).status == "done"


def test_an_older_write_after_a_flushed_delete_is_ignored(harness: Harness) -> None:
    """A delete at version 6 flushed, then a write at 3: the write is ignored, the row stays deleted and get() returns None."""
    h = harness
    _setup(h)
    cache = h.cache
    cache.write("user", 1, {"name": "v5", "version": 5})
    _flush(h)
    cache.delete("user", 1, version=6)
    _flush(h)
    assert h.rows("users") == {}
    assert cache.write("user", 1, {"name": "v3", "version": 3}) == ""
    assert cache.delete("user", 1, version=4) == ""
    many = cache.write_many(
        "user", {1: {"name": "v2", "version": 2}, 2: {"name": "b", "version": 1}}
    )
    assert many.outranked == ["1"] and list(many.taken) == ["2"]
    _flush(h)
    assert sorted(h.rows("users")) == [2]
    assert cache.get("user", 1) is None
    assert cache.write("user", 1, {"name": "v7", "version": 7})  # a newer version is taken
    _flush(h)
    assert h.rows("users")[1]["name"] == "v7"


def test_the_tombstone_lasts_tombstone_ttl(pg_harness: Harness) -> None:
    """Once `tombstone_ttl` has passed, an older write is taken like any other (the documented limit)."""
    h = pg_harness
    _setup(h, tombstone_ttl="300ms")
    cache = h.cache
    cache.delete("user", 1, version=6)
    _flush(h)
    assert cache.write("user", 1, {"name": "early", "version": 3}) == ""
    tomb = h.context.keys.tombstone("user", "1")
    wait_for(lambda: not cache.redis.exists(tomb), 5, what="the tombstone to expire")
    assert cache.write("user", 1, {"name": "late", "version": 3})
    _flush(h)
    assert h.rows("users")[1]["name"] == "late"
