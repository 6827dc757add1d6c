"""Versioned deletes leave a tombstone: an older write after the delete never brings the row back."""

from __future__ import annotations

import pytest

from cachewarden.errors import Outranked
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
    """A delete at version 6 flushed, then a write at 3: write() and delete() at a lower version raise Outranked naming the key, both versions and the fix, write_many lists such a key in .outranked, the row stays deleted and get() returns None."""
    h = harness
    _setup(h)
    cache = h.cache
    cache.write("user", 1, {"name": "v5", "version": 5})
    _flush(h)
    cache.delete("user", 1, version=6)
    _flush(h)
    assert h.rows("users") == {}
    with pytest.raises(Outranked) as write:
        cache.write("user", 1, {"name": "v3", "version": 3})
    assert (write.value.op, write.value.version, write.value.newer) == ("write", "3", "6")
    assert "user:1: the write at version 3" in str(write.value)
    assert "Write a version above 6" in str(write.value)
    with pytest.raises(Outranked, match="the delete at version 4 was not taken"):
        cache.delete("user", 1, version=4)
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
    """Once `tombstone_ttl` has passed, an older write is taken like any other (the documented limit); before, it raises Outranked."""
    h = pg_harness
    _setup(h, tombstone_ttl="2s")
    cache = h.cache
    cache.delete("user", 1, version=6)
    _flush(h)
    with pytest.raises(Outranked):
        cache.write("user", 1, {"name": "early", "version": 3})
    tomb = h.context.keys.tombstone("user", "1")
    wait_for(lambda: not cache.redis.exists(tomb), 10, what="the tombstone to expire")
    assert cache.write("user", 1, {"name": "late", "version": 3})
    _flush(h)
    assert h.rows("users")[1]["name"] == "late"
