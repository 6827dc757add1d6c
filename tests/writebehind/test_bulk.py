"""Whole batches through each database's bulk path: PostgreSQL's COPY and merge,
MariaDB's lookup of the rows a version guard kept, and reading ahead while the
previous batch's finish runs.

Flushes are driven by calling `flush_shard` directly (no worker).
"""

from __future__ import annotations

from typing import Any

import pytest

from cachewarden.codec import decode_row
from cachewarden.writebehind.flush import flush_shard
from cachewarden.writebehind.pgcopy import COPY_MIN_ROWS, CopyMerge
from cachewarden.writebehind.sink import SqlSink
from tests.conftest import Harness

VERSIONED: dict[str, Any] = {
    "table": "users",
    "key": "id",
    "ttl": "10m",
    "version_column": "version",
}
ROWS = 200  # over COPY_MIN_ROWS: the batch is a bulk one on PostgreSQL


def _entry(h: Harness, key: int) -> dict[str, Any] | None:
    text = h.cache.redis.get(h.cache.keys.entry("user", str(key)))
    assert text is not None, f"no cache entry for key {key}"
    return decode_row(text)


def test_a_bulk_batch_keeps_every_newer_stored_row_and_writes_the_rest(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of 200 writes, every odd one older than its stored row, leaves the odd rows
    and cache entries at the stored version and writes the even ones, through PostgreSQL's
    COPY merge (its guard refused exactly the odd keys) and MariaDB's mismatch lookup."""
    assert ROWS > COPY_MIN_ROWS
    h = harness
    h.create_table("users")
    h.configure({"user": VERSIONED}, {"user": {"shards": 1, "batch_size": 1000}})
    h.cache.write_many("user", {k: {"name": "stored", "version": 10} for k in range(ROWS)})
    assert flush_shard(h.context, "user", 0).status == "done"

    refused: list[set[Any]] = []
    copy_apply = CopyMerge.apply

    def spy_copy(self: CopyMerge, *args: Any, **kwargs: Any) -> set[Any] | None:
        lost = copy_apply(self, *args, **kwargs)
        if lost is not None:
            refused.append(set(lost))
        return lost

    mismatched: list[list[Any]] = []
    lookup = SqlSink._mismatched

    def spy_lookup(self: SqlSink, *args: Any, **kwargs: Any) -> list[Any] | None:
        found = lookup(self, *args, **kwargs)
        if found is not None:
            mismatched.append(found)
        return found

    monkeypatch.setattr(CopyMerge, "apply", spy_copy)
    monkeypatch.setattr(SqlSink, "_mismatched", spy_lookup)
    # Odd keys: an older version than stored (outranked); even keys: a newer one.
    h.cache.write_many(
        "user",
        {k: {"name": f"new-{k}", "version": 20 if k % 2 == 0 else 5} for k in range(ROWS)},
    )
    assert flush_shard(h.context, "user", 0).status == "done"

    odd = {k for k in range(ROWS) if k % 2}
    rows = h.rows("users")
    assert {k for k, r in rows.items() if (r["name"], r["version"]) == ("stored", 10)} == odd
    assert all(rows[k]["name"] == f"new-{k}" for k in range(0, ROWS, 2))
    assert all(_entry(h, k) == {"id": k, "name": "stored", "version": 10} for k in odd)
    assert all(
        _entry(h, k) == {"id": k, "name": f"new-{k}", "version": 20} for k in range(0, ROWS, 2)
    )
    dialect = h.engine.dialect.name
    if dialect == "postgresql":
        assert refused == [odd]
    elif dialect in ("mysql", "mariadb"):
        assert [sorted(int(key) for key, _ in found) for found in mismatched] == [sorted(odd)]
    assert h.buffered() == 0


def test_a_drain_of_many_full_batches_lands_every_write_once(harness: Harness) -> None:
    """Ten full batches drained in one flush (each next batch read ahead, each finish run
    while the next batch applies) land every write's last value, in the database and the
    cache with its TTL, and leave nothing pending."""
    h = harness
    h.create_table("users")
    h.configure({"user": VERSIONED}, {"user": {"shards": 1, "batch_size": 100}})
    for round_no in (1, 2):
        h.cache.write_many(
            "user", {k: {"name": f"r{round_no}-{k}", "version": round_no} for k in range(500)}
        )
    result = flush_shard(h.context, "user", 0)
    assert result.status == "done" and result.batches == 10 and result.entries == 1000
    rows = h.rows("users")
    assert {k: (r["name"], r["version"]) for k, r in rows.items()} == {
        k: (f"r2-{k}", 2) for k in range(500)
    }
    keys = [h.cache.keys.entry("user", str(k)) for k in range(500)]
    assert all(0 < int(h.cache.redis.pttl(key)) <= 600_000 for key in keys)
    assert h.buffered() == 0
    assert h.cache.redis.hlen(h.cache.keys.dirty("user", 0)) == 0


def test_a_flush_after_redis_forgot_the_scripts_still_settles_every_key(harness: Harness) -> None:
    """After SCRIPT FLUSH, a flush whose finish.lua is sent ahead meets NOSCRIPT, loads
    the script and runs it once: every key lands, settles with its TTL and nothing stays
    pending or dirty."""
    h = harness
    h.create_table("users")
    h.configure({"user": VERSIONED}, {"user": {"shards": 1, "batch_size": 50}})
    h.cache.write_many("user", {k: {"name": f"n{k}", "version": 1} for k in range(120)})
    h.cache.redis.script_flush()
    assert not any(h.cache.redis.script_exists(h.context.lua.script("finish").sha))
    result = flush_shard(h.context, "user", 0)
    assert result.status == "done" and result.entries == 120 and result.batches == 3
    assert sorted(h.rows("users")) == list(range(120))
    keys = [h.cache.keys.entry("user", str(k)) for k in range(120)]
    assert all(0 < int(h.cache.redis.pttl(key)) <= 600_000 for key in keys)
    assert h.buffered() == 0
    assert h.cache.redis.hlen(h.cache.keys.dirty("user", 0)) == 0
