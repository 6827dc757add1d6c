"""Cache.write and Cache.delete on bad input and a full buffer (real Redis and PostgreSQL).

Every refusal happens before anything reaches Redis: no stream entry, no cache
entry, nothing else touched; and a good write right after still works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from cachewarden.cache import Cache
from cachewarden.codec import decode_row
from cachewarden.errors import Backpressure, InvalidKey, InvalidValue, UnknownEntity
from cachewarden.keys import shard_of
from cachewarden.writebehind.flush import flush_shard
from tests.conftest import Harness
from tests.helpers import CountingConnection

SHARDS = 4
USER: dict[str, Any] = {"table": "users", "key": "id", "ttl": "10m", "max_value_bytes": 200}
ACCOUNT: dict[str, Any] = {
    "table": "accounts",
    "key": "id",
    "ttl": "10m",
    "version_column": "version",
}

Snapshot = dict[str, Any]


def _setup(h: Harness) -> None:
    # (id, name): the rows written here are whole rows. The bad values' "born" column is
    # refused before anything is sent, whatever the table has.
    h.create_table("users", version=False)
    h.create_table("accounts", version=True)
    h.configure(
        {"user": USER, "account": ACCOUNT},
        {"user": {"shards": SHARDS}, "account": {"shards": SHARDS}},
    )
    # Something already buffered and cached, which a refused write must not disturb.
    h.cache.write("user", 1, {"name": "existing"})
    h.cache.write("account", 1, {"name": "existing", "version": 3})


def _snapshot(h: Harness) -> Snapshot:
    """Every key under the test's prefix with its value (streams by length and ids), but
    the memory mark (enqueue.lua's note of its last look at INFO, not data)."""
    redis = h.cache.redis
    state: Snapshot = {}
    for key in redis.scan_iter(f"{h.prefix}:*", count=1000):
        if key == h.cache.keys.memory_mark():
            continue
        kind = redis.type(key)
        if kind == "string":
            state[key] = (redis.get(key), redis.pttl(key))
        elif kind == "stream":
            state[key] = [sid for sid, _ in redis.xrange(key) or []]
        elif kind == "hash":
            state[key] = redis.hgetall(key)
        elif kind == "zset":
            state[key] = redis.zrange(key, 0, -1, withscores=True)
        else:
            state[key] = kind
    return state


def _stream_lengths(h: Harness) -> list[int]:
    keys = h.cache.keys
    return [
        h.cache.redis.xlen(keys.stream(e, s)) for e in ("user", "account") for s in range(SHARDS)
    ]


def _flush_all(h: Harness, entity: str) -> None:
    for shard in range(SHARDS):
        result = flush_shard(h.context, entity, shard)
        assert result.status == "done", result.errors


def _good_write_still_works(h: Harness) -> None:
    h.cache.write("user", 99, {"name": "good"})
    _flush_all(h, "user")
    rows = h.rows("users")
    assert rows[99]["name"] == "good"
    assert rows[1]["name"] == "existing"
    entry = h.cache.redis.get(h.cache.keys.entry("user", "99"))
    assert entry is not None and decode_row(entry) == {"id": 99, "name": "good"}


def _write_key(key: str) -> Callable[[Cache], Any]:
    return lambda c: c.write("user", key, {"name": "x"})


BAD_WRITES: list[tuple[str, Callable[[Cache], Any], type[Exception], list[str]]] = [
    (
        "unknown-entity",
        lambda c: c.write("usr", 5, {"name": "x"}),
        UnknownEntity,
        ["'usr'", "account, user", "[entities.usr]"],
    ),
    ("unknown-entity-delete", lambda c: c.delete("usr", 5), UnknownEntity, ["'usr'"]),
    (
        "complex",
        lambda c: c.write("user", 5, {"name": "x", "born": complex(1, 2)}),
        InvalidValue,
        ["user:5", "column 'born'", "holds a complex", "convert it to str"],
    ),
    (
        "set",
        lambda c: c.write("user", 5, {"name": {"a", "b"}}),
        InvalidValue,
        ["user:5", "column 'name'", "holds a set", "convert it to str"],
    ),
    (
        "nan",
        lambda c: c.write("user", 5, {"name": "x", "born": float("nan")}),
        InvalidValue,
        ["user:5", "column 'born'", "nan"],
    ),
    (
        "not-a-dict",
        lambda c: c.write("user", 5, ["x"]),  # type: ignore[arg-type]
        InvalidValue,
        ["user:5", "list", "pass a dict of column values"],
    ),
    (
        "too-large",
        lambda c: c.write("user", 5, {"name": "x" * 300}),
        InvalidValue,
        ["user:5", "limit of 200", "entities.user.max_value_bytes"],
    ),
    (
        "key-mismatch",
        lambda c: c.write("user", 5, {"id": 6, "name": "x"}),
        InvalidValue,
        ["user:5", "row['id'] is 6", "not the key '5'"],
    ),
    (
        "no-version",
        lambda c: c.write("account", 5, {"name": "x"}),
        InvalidValue,
        ["account:5", "row['version']", "int version", "entities.account.version_column", "None"],
    ),
    (
        "str-version",
        lambda c: c.write("account", 5, {"name": "x", "version": "7"}),
        InvalidValue,
        ["account:5", "row['version']", "'7'"],
    ),
    (
        "bool-version",
        lambda c: c.write("account", 5, {"name": "x", "version": True}),
        InvalidValue,
        ["account:5", "True"],
    ),
    (
        "version-without-column",
        lambda c: c.delete("user", 1, version=4),
        InvalidValue,
        ["user:1", "no version_column"],
    ),
    (
        "float-key",
        lambda c: c.write("user", 1.5, {"name": "x"}),  # type: ignore[arg-type]
        InvalidKey,
        ["user:", "1.5", "float", "use a str or an int"],
    ),
    ("empty-key", lambda c: c.write("user", "", {"name": "x"}), InvalidKey, ["user:", "empty"]),
    ("space-key", lambda c: c.delete("user", "a b"), InvalidKey, ["'a b'", "spaces"]),
    (
        "long-key",
        lambda c: c.write("user", "k" * 600, {"name": "x"}),
        InvalidKey,
        ["'kkkk", "512 bytes"],
    ),
]
BAD_WRITES += [
    (
        f"key-{ch}",
        _write_key(f"1{ch}"),
        InvalidKey,
        [f"'1{ch}'", "may not hold"],
    )
    for ch in "*?[]:"
]


@pytest.mark.parametrize(
    ("call", "error", "says"),
    [case[1:] for case in BAD_WRITES],
    ids=[case[0] for case in BAD_WRITES],
)
def test_bad_input_is_refused_before_enqueue(
    pg_harness: Harness, call: Callable[[Cache], Any], error: type[Exception], says: list[str]
) -> None:
    """Bad input raises a clear error naming entity, key or column and the fix; Redis is untouched."""
    h = pg_harness
    _setup(h)
    before = _snapshot(h)
    lengths = _stream_lengths(h)
    with pytest.raises(error) as info:
        call(h.cache)
    for fragment in says:
        assert fragment in str(info.value)
    assert _stream_lengths(h) == lengths
    assert _snapshot(h) == before
    _good_write_still_works(h)


def test_full_shard_raises_backpressure_and_drops_nothing(pg_harness: Harness) -> None:
    """A shard at max_pending refuses the next write with Backpressure; after a flush all 20 land."""
    h = pg_harness
    h.create_table("users", version=False)
    h.configure(
        {"user": {"table": "users", "key": "id", "ttl": "10m"}},
        {"user": {"shards": 1, "batch_size": 10, "max_pending": 20}},
    )
    stream = h.cache.keys.stream("user", 0)
    for k in range(1, 21):
        h.cache.write("user", k, {"name": f"n{k}"})
    assert h.cache.redis.xlen(stream) == 20
    before = _snapshot(h)

    with pytest.raises(Backpressure) as info:
        h.cache.write("user", 21, {"name": "n21"})
    message = str(info.value)
    assert "user: shard 0 holds 20" in message and "max_pending" in message
    assert "'21'" in message and "Retry later" in message
    with pytest.raises(Backpressure):
        h.cache.write("user", 1, {"name": "overwrite"})
    with pytest.raises(Backpressure):
        h.cache.delete("user", 2)
    assert h.cache.redis.xlen(stream) == 20
    assert _snapshot(h) == before, "a refused write must change nothing in Redis"

    result = flush_shard(h.context, "user", 0)
    assert (result.status, result.entries, result.applied, result.batches) == ("done", 20, 20, 2)
    assert {k: r["name"] for k, r in h.rows("users").items()} == {k: f"n{k}" for k in range(1, 21)}
    h.cache.write("user", 21, {"name": "n21"})
    flush_shard(h.context, "user", 0)
    assert h.count("users") == 21


# -- the batch forms ---------------------------------------------------------------


def _counted_cache(h: Harness) -> Cache:
    """A Cache on the harness config whose Redis round trips are counted."""
    assert h.settings is not None
    pool = redis.ConnectionPool.from_url(
        h.settings.redis.url, decode_responses=True, connection_class=CountingConnection
    )
    cache = Cache(h.settings, redis=redis.Redis(connection_pool=pool))
    cache.redis.ping()  # the connection's own set-up commands are not what is counted
    return cache


def test_write_many_is_one_round_trip_and_every_row_lands(pg_harness: Harness) -> None:
    """write_many of 100 rows over 4 shards is one Redis round trip; each row is cached at once and lands in the database."""
    h = pg_harness
    _setup(h)
    with _counted_cache(h) as cache:
        rows = {k: {"name": f"batch-{k}"} for k in range(100, 200)}
        CountingConnection.sent = 0
        result = cache.write_many("user", rows)
        assert CountingConnection.sent == 1
    assert result.ok and sorted(result.taken) == sorted(str(k) for k in rows)
    assert len({(shard_of(k, SHARDS), sid) for k, sid in result.taken.items()}) == 100
    for k in (100, 150, 199):
        assert h.cache.get("user", k) == {"id": k, "name": f"batch-{k}"}
    _flush_all(h, "user")
    assert {k: r["name"] for k, r in h.rows("users").items() if k >= 100} == {
        k: f"batch-{k}" for k in rows
    }


def test_write_many_reports_bad_and_backpressured_rows_and_takes_the_rest(
    pg_harness: Harness,
) -> None:
    """In one write_many, invalid rows and rows past max_pending are refused with their errors; every other row is taken and lands."""
    h = pg_harness
    h.create_table("users", version=False)
    h.configure(
        {"user": {"table": "users", "key": "id", "ttl": "10m"}},
        {"user": {"shards": 1, "batch_size": 10, "max_pending": 20}},
    )
    for k in range(1, 16):
        h.cache.write("user", k, {"name": f"n{k}"})
    batch: list[tuple[str | int, Any]] = [
        ("a b", {"name": "bad key"}),
        (16, ["not", "a", "dict"]),
        (17, {"name": float("nan")}),
        *((k, {"name": f"n{k}"}) for k in range(18, 26)),
    ]
    result = h.cache.write_many("user", batch)
    assert sorted(result.taken) == [str(k) for k in range(18, 23)]  # 15 pending + 5 = 20
    assert isinstance(result.refused["a b"], InvalidKey)
    assert isinstance(result.refused["16"], InvalidValue)
    assert isinstance(result.refused["17"], InvalidValue)
    for k in range(23, 26):
        assert isinstance(result.refused[str(k)], Backpressure)
        assert "max_pending" in str(result.refused[str(k)])
    assert not result.ok and len(result.refused) == 6
    assert h.cache.redis.xlen(h.cache.keys.stream("user", 0)) == 20
    assert h.cache.redis.get(h.cache.keys.entry("user", "23")) is None
    _flush_all_shards(h, shards=1)
    assert sorted(h.rows("users")) == [*range(1, 16), *range(18, 23)]


def test_delete_many_deletes_in_one_round_trip_and_reports_bad_keys(pg_harness: Harness) -> None:
    """delete_many marks its keys absent in one round trip, refuses an invalid key by name, and the deletes reach the database."""
    h = pg_harness
    _setup(h)
    for k in (7, 8, 9):
        h.cache.write("user", k, {"name": f"d{k}"})
    _flush_all(h, "user")
    with _counted_cache(h) as cache:
        CountingConnection.sent = 0
        result = cache.delete_many("user", [7, 8, "bad:key"])
        assert CountingConnection.sent == 1
    assert sorted(result.taken) == ["7", "8"]
    assert list(result.refused) == ["bad:key"] and isinstance(result.refused["bad:key"], InvalidKey)
    assert h.cache.get("user", 7) is None and h.cache.get("user", 8) is None
    _flush_all(h, "user")
    assert 7 not in h.rows("users") and 8 not in h.rows("users") and 9 in h.rows("users")


def _flush_all_shards(h: Harness, shards: int) -> None:
    for shard in range(shards):
        assert flush_shard(h.context, "user", shard).status == "done"
