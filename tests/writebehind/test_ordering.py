"""Per-key order through the write-behind flusher, on PostgreSQL, MariaDB and SQLite.

Flushes are driven by calling `flush_shard` directly (no worker), so every step is
deterministic. Every entity here has one shard: shard 0 holds all writes.
"""

from __future__ import annotations

from typing import Any

import pytest

from cachewarden.codec import decode_row
from cachewarden.errors import Outranked
from cachewarden.writebehind.flush import FlushResult, ShardFlusher, flush_shard, sink_for
from tests.conftest import Harness
from tests.helpers import wait_for

TTL_MS = 600_000
USER: dict[str, Any] = {"table": "users", "key": "id", "ttl": "10m"}
VERSIONED: dict[str, Any] = {**USER, "version_column": "version"}
ONE_SHARD: dict[str, Any] = {"shards": 1, "batch_size": 1000}


def _setup(h: Harness, entity: dict[str, Any], *, version: bool, **wb: Any) -> None:
    h.create_table("users", version=version)
    h.configure({"user": entity}, {"user": {**ONE_SHARD, **wb}})


def _flush(h: Harness) -> FlushResult:
    result = flush_shard(h.context, "user", 0)
    assert result.status == "done", result.errors
    return result


def _entry(h: Harness, key: int) -> dict[str, Any] | None:
    text = h.cache.redis.get(h.cache.keys.entry("user", str(key)))
    assert text is not None, f"no cache entry for key {key}"
    return decode_row(text)


def _pttl(h: Harness, key: int) -> int:
    return int(h.cache.redis.pttl(h.cache.keys.entry("user", str(key))))


def _assert_drained(h: Harness) -> None:
    """The shard's stream and its dirty hash are empty."""
    redis, keys = h.cache.redis, h.cache.keys
    stream = keys.stream("user", 0)
    assert redis.xlen(stream) == 0
    assert redis.hlen(keys.dirty("user", 0)) == 0


class _Crash(BaseException):
    """Stands for the flusher's process dying (nothing in the flusher may catch it)."""


class _CrashAfterCommit(ShardFlusher):
    """A flusher whose process dies after its database commit, before it acknowledges."""

    def _finish(self, *args: Any) -> None:
        raise _Crash

    def _release(self, hold_ms: int) -> None:
        """A dead process releases nothing: its lock expires on its own."""


def test_replayed_batch_later_write_wins(harness: Harness) -> None:
    """A batch committed but never acknowledged is replayed before newer writes, which end in the DB."""
    h = harness
    _setup(h, USER, version=False, lock_ttl="1s")
    keys = list(range(1, 21))
    for k in keys:
        h.cache.write("user", k, {"name": f"v1-{k}"})
    sink_for(h.context, "user")  # build the engine and sink first, so the copy shares them
    with pytest.raises(_Crash):
        _CrashAfterCommit(h.context, h.context.entity("user"), 0).run(5000)
    # The crashed flusher committed v1 and left every entry in the stream.
    assert {k: r["name"] for k, r in h.rows("users").items()} == {k: f"v1-{k}" for k in keys}
    stream = h.cache.keys.stream("user", 0)
    assert h.cache.redis.xlen(stream) == len(keys)

    for k in keys:
        h.cache.write("user", k, {"name": f"v2-{k}"})
    lock = h.cache.keys.flush_lock("user", 0)
    wait_for(lambda: not h.cache.redis.exists(lock), 15, what="the dead flusher's lock to expire")
    result = _flush(h)

    assert result.entries == 2 * len(keys)
    assert {k: r["name"] for k, r in h.rows("users").items()} == {k: f"v2-{k}" for k in keys}
    _assert_drained(h)
    for k in keys:
        assert _entry(h, k) == {"id": k, "name": f"v2-{k}"}
        assert 0 < _pttl(h, k) <= TTL_MS


def test_out_of_order_versions_in_one_batch(harness: Harness) -> None:
    """Version 2 then version 1 of a key in one batch: the DB and the cache keep version 2."""
    h = harness
    _setup(h, VERSIONED, version=True)
    for k in (1, 2, 3):
        h.cache.write("user", k, {"name": f"two-{k}", "version": 2})
        h.cache.write("user", k, {"name": f"one-{k}", "version": 1})
        assert _entry(h, k) == {"id": k, "name": f"two-{k}", "version": 2}
    result = _flush(h)
    assert result.applied == 3
    rows = h.rows("users")
    assert {k: (r["name"], r["version"]) for k, r in rows.items()} == {
        k: (f"two-{k}", 2) for k in (1, 2, 3)
    }
    for k in (1, 2, 3):
        assert _entry(h, k) == {"id": k, "name": f"two-{k}", "version": 2}
        assert 0 < _pttl(h, k) <= TTL_MS
    _assert_drained(h)


def test_out_of_order_versions_in_separate_flushes(harness: Harness) -> None:
    """Version 2 flushed, then version 1 flushed: the DB and the cache keep version 2."""
    h = harness
    _setup(h, VERSIONED, version=True)
    h.cache.write("user", 1, {"name": "two", "version": 2})
    _flush(h)
    h.cache.write("user", 1, {"name": "one", "version": 1})
    _flush(h)
    row = h.rows("users")[1]
    assert (row["name"], row["version"]) == ("two", 2)
    assert _entry(h, 1) == {"id": 1, "name": "two", "version": 2}
    assert 0 < _pttl(h, 1) <= TTL_MS
    _assert_drained(h)


def test_higher_version_replaces_lower_across_flushes(harness: Harness) -> None:
    """Version 1 flushed, then version 2 flushed: the DB and the cache move to version 2."""
    h = harness
    _setup(h, VERSIONED, version=True)
    h.cache.write("user", 1, {"name": "one", "version": 1})
    _flush(h)
    h.cache.write("user", 1, {"name": "two", "version": 2})
    _flush(h)
    row = h.rows("users")[1]
    assert (row["name"], row["version"]) == ("two", 2)
    assert _entry(h, 1) == {"id": 1, "name": "two", "version": 2}


@pytest.mark.parametrize("split", [False, True], ids=["one-batch", "two-flushes"])
def test_without_version_last_write_call_wins(harness: Harness, split: bool) -> None:
    """Without a version column, stream order decides: the last write() call wins."""
    h = harness
    _setup(h, USER, version=False)
    h.cache.write("user", 1, {"name": "first"})
    if split:
        _flush(h)
    h.cache.write("user", 1, {"name": "second"})
    _flush(h)
    assert h.rows("users")[1]["name"] == "second"
    assert _entry(h, 1) == {"id": 1, "name": "second"}
    _assert_drained(h)


def test_write_then_delete_in_one_batch(harness: Harness) -> None:
    """A write then a delete of a stored key in one batch: no row and no cache entry remain."""
    h = harness
    _setup(h, USER, version=False)
    h.cache.write("user", 1, {"name": "stored"})
    _flush(h)
    h.cache.write("user", 1, {"name": "newer"})
    h.cache.delete("user", 1)
    result = _flush(h)
    assert result.entries == 2 and result.applied == 1
    assert h.count("users") == 0
    assert h.cache.redis.exists(h.cache.keys.entry("user", "1")) == 0
    _assert_drained(h)


def test_delete_then_write_in_one_batch(harness: Harness) -> None:
    """A delete then a write of a stored key in one batch: the write ends in the DB and the cache."""
    h = harness
    _setup(h, USER, version=False)
    h.cache.write("user", 1, {"name": "stored"})
    _flush(h)
    h.cache.delete("user", 1)
    h.cache.write("user", 1, {"name": "reborn"})
    result = _flush(h)
    assert result.entries == 2 and result.applied == 1
    assert h.rows("users") == {1: {"id": 1, "name": "reborn"}}
    assert _entry(h, 1) == {"id": 1, "name": "reborn"}
    assert 0 < _pttl(h, 1) <= TTL_MS
    _assert_drained(h)


def test_delete_then_flush_removes_row_and_entry(harness: Harness) -> None:
    """A delete, once flushed, leaves no row and no cache entry (not even the absent marker)."""
    h = harness
    _setup(h, USER, version=False)
    for k in (1, 2):
        h.cache.write("user", k, {"name": f"n{k}"})
    _flush(h)
    h.cache.delete("user", 1)
    assert h.cache.redis.get(h.cache.keys.entry("user", "1")) == "null"
    assert _pttl(h, 1) == -1
    _flush(h)
    assert set(h.rows("users")) == {2}
    assert h.cache.redis.exists(h.cache.keys.entry("user", "1")) == 0
    assert _entry(h, 2) == {"id": 2, "name": "n2"}
    _assert_drained(h)


def test_hot_keys_write_one_row_per_key_per_batch(harness: Harness) -> None:
    """300 writes over 5 keys in batches of 100 apply 5 rows per batch, each key's last value."""
    h = harness
    _setup(h, USER, version=False, batch_size=100, max_pending=1000)
    last: dict[int, str] = {}
    for i in range(300):
        key = i % 5 + 1
        h.cache.write("user", key, {"name": f"w{i}"})
        last[key] = f"w{i}"
    result = _flush(h)
    assert (result.entries, result.batches, result.applied) == (300, 3, 15)
    assert {k: r["name"] for k, r in h.rows("users").items()} == last
    _assert_drained(h)


def test_hot_keys_in_one_batch_apply_distinct_keys(harness: Harness) -> None:
    """Many writes to few keys in one batch apply exactly one row per distinct key."""
    h = harness
    _setup(h, USER, version=False)
    for i in range(500):
        h.cache.write("user", i % 7, {"name": f"w{i}"})
    result = _flush(h)
    assert (result.entries, result.batches, result.applied) == (500, 1, 7)
    assert h.count("users") == 7


def test_pending_entries_have_no_ttl_until_flushed(harness: Harness) -> None:
    """A pending entry has no TTL (PTTL -1); the flush gives it the entity's TTL back."""
    h = harness
    _setup(h, USER, version=False)
    for k in (1, 2, 3):
        h.cache.write("user", k, {"name": "a"})
        assert _pttl(h, k) == -1
    _flush(h)
    for k in (1, 2, 3):
        assert TTL_MS - 60_000 < _pttl(h, k) <= TTL_MS
    h.cache.write("user", 2, {"name": "b"})
    assert _pttl(h, 2) == -1, "a new pending write must clear the TTL again"
    assert _pttl(h, 1) > 0
    _flush(h)
    assert TTL_MS - 60_000 < _pttl(h, 2) <= TTL_MS


def test_versioned_delete_beats_a_stale_write_in_db_and_cache(harness: Harness) -> None:
    """A delete at version 6 then a write at version 3 leave no row and no entry: the write is refused as Outranked by the delete's tombstone."""
    h = harness
    _setup(h, VERSIONED, version=True)
    h.cache.write("user", 1, {"name": "five", "version": 5})
    _flush(h)
    h.cache.delete("user", 1, version=6)
    with pytest.raises(Outranked, match="version 3 was not taken"):
        h.cache.write("user", 1, {"name": "stale", "version": 3})
    _flush(h)
    assert h.rows("users") == {}
    # Before the fix in finish.lua the stale write stayed cached with no TTL, for ever.
    assert h.cache.redis.exists(h.cache.keys.entry("user", "1")) == 0
    _assert_drained(h)


def test_late_lower_version_after_expiry_is_not_cached(harness: Harness) -> None:
    """Version 2 flushed, its entry expired, then version 1 flushed: the cache must not serve 1."""
    h = harness
    _setup(h, VERSIONED, version=True)
    h.cache.write("user", 1, {"name": "two", "version": 2})
    _flush(h)
    h.cache.redis.delete(h.cache.keys.entry("user", "1"))  # the entry's TTL ran out
    h.cache.write("user", 1, {"name": "one", "version": 1})
    _flush(h)
    row = h.rows("users")[1]
    assert (row["name"], row["version"]) == ("two", 2)
    cached = h.cache.redis.get(h.cache.keys.entry("user", "1"))
    assert cached is None or decode_row(cached) == {"id": 1, "name": "two", "version": 2}


def test_unversioned_delete_then_lower_version_write(harness: Harness) -> None:
    """Delete (no version) then re-create at version 1 in one batch: the DB holds the new row."""
    h = harness
    _setup(h, VERSIONED, version=True)
    h.cache.write("user", 1, {"name": "five", "version": 5})
    _flush(h)
    h.cache.delete("user", 1)
    h.cache.write("user", 1, {"name": "reborn", "version": 1})
    _flush(h)
    assert h.rows("users")[1]["name"] == "reborn"
    cached = h.cache.redis.get(h.cache.keys.entry("user", "1"))
    assert cached is not None and decode_row(cached)["name"] == "reborn"
