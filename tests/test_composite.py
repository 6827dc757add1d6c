"""Composite keys (`key = ["tenant_id", "id"]`) on PostgreSQL, MariaDB and SQLite (issue 19).

A key is a tuple of its columns' values; its text is codec.key_text's encoding.
Each test here writes, reads, flushes, refreshes or warms through the same code as
one-column keys, driven in-process against the real servers, and tenants whose
names hold the encoding's separators (',' and '%') stand beside plain ones, so a
collision of their texts would show as a lost or merged row.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from cachewarden.cache import Cache
from cachewarden.codec import key_parts, key_text
from cachewarden.errors import ConfigError, InvalidKey, InvalidValue
from cachewarden.readpath.refresh import refresh_keys
from cachewarden.warming.run import start_run
from cachewarden.writebehind.flush import flush_shard
from tests.conftest import Harness

ORDER = {"table": "orders", "key": ["tenant_id", "id"], "ttl": "10m", "version_column": "version"}
# Distinct keys whose parts hold the separators: a naive join would make the first
# two the same text ("a,b,1").
TRICKY = [("a,b", 1), ("a", "b,1"), ("100%", 1), ("100%25", 1)]


def _setup(h: Harness, shards: int = 2, **entity: Any) -> None:
    with h.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE orders (tenant_id VARCHAR(50) NOT NULL, id VARCHAR(50) NOT NULL, "
            "total INTEGER, version BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (tenant_id, id))"
        )
    h.configure({"order": ORDER | entity}, {"order": {"shards": shards, "max_delay": "1h"}})


def _int_setup(h: Harness, **warming: Any) -> None:
    with h.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE items (tenant_id INTEGER NOT NULL, id INTEGER NOT NULL, "
            "qty INTEGER, PRIMARY KEY (tenant_id, id))"
        )
    h.configure(
        {"line": {"table": "items", "key": ["tenant_id", "id"], "ttl": "10m"}},
        {"line": {"shards": 2}},
        warming=warming or None,
    )


def _flush(h: Harness, entity: str = "order") -> None:
    shards = h.context.entity(entity).write_behind.shards
    for shard in range(shards):
        assert flush_shard(h.context, entity, shard).status == "done"
    assert h.buffered(entity) == 0


def _orders(h: Harness) -> dict[tuple[str, str], dict[str, Any]]:
    with h.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM orders")).mappings()
        return {(r["tenant_id"], r["id"]): dict(r) for r in rows}


def _drop_entries(h: Harness, entity: str) -> None:
    redis = h.context.redis
    names = list(redis.scan_iter(h.context.keys.entry_prefix(entity) + "*"))
    if names:
        redis.delete(*names)


def test_the_key_text_is_unambiguous() -> None:
    """Composite keys whose parts hold ',' and '%' get distinct texts that split back into their parts."""
    texts = [key_text("order", key, 2) for key in TRICKY]
    assert len(set(texts)) == len(TRICKY)
    assert texts[0] == "a%2Cb,1" and key_text("order", ("acme", 42), 2) == "acme,42"
    for key, text in zip(TRICKY, texts, strict=True):
        assert key_parts(text, 2) == [str(part) for part in key]


def test_a_wrong_key_shape_names_the_columns(harness: Harness) -> None:
    """A str, a tuple of the wrong length, or a row contradicting the key is refused naming what the key needs, and sends nothing."""
    h = harness
    _setup(h)
    before = set(h.cache.redis.keys(f"{h.prefix}*"))
    with pytest.raises(InvalidKey, match=r"has 2 columns: pass a tuple of 2 values"):
        h.cache.write("order", "acme,1", {"total": 1, "version": 1})
    with pytest.raises(InvalidKey, match=r"of 3 values; the key of order has 2 columns"):
        h.cache.get("order", ("acme", "1", "x"))
    with pytest.raises(InvalidValue, match=r"row\['tenant_id'\] is 'beta', not 'acme'"):
        h.cache.write("order", ("acme", "1"), {"tenant_id": "beta", "total": 1, "version": 1})
    assert set(h.cache.redis.keys(f"{h.prefix}*")) == before


def test_composite_keys_are_written_read_and_flushed(harness: Harness) -> None:
    """Writes of composite keys (the same id under two tenants, and parts holding ',' and '%') are read back at once and land as distinct rows; a versioned delete removes one row only."""
    h = harness
    _setup(h)
    keys = [("acme", "1"), ("beta", "1"), *((t, str(i)) for t, i in TRICKY)]
    for n, key in enumerate(keys):
        h.cache.write("order", key, {"total": n, "version": 1})
    assert h.cache.get("order", ("beta", "1")) == {
        "tenant_id": "beta",
        "id": "1",
        "total": 1,
        "version": 1,
    }
    _flush(h)
    assert _orders(h) == {
        key: {"tenant_id": key[0], "id": key[1], "total": n, "version": 1}
        for n, key in enumerate(keys)
    }
    h.cache.delete("order", ("acme", "1"), version=1)
    _flush(h)
    assert ("acme", "1") not in _orders(h) and ("beta", "1") in _orders(h)
    assert h.cache.get("order", ("acme", "1")) is None


def test_a_composite_write_outranked_in_the_database_is_not_applied(harness: Harness) -> None:
    """A buffered write older than the row's version in the database leaves the newer row (the version guard matches rows by both key columns)."""
    h = harness
    _setup(h)
    with h.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO orders (tenant_id, id, total, version) VALUES ('acme', '1', 50, 5), "
            "('beta', '1', 60, 1)"
        )
    h.cache.write_many(
        "order",
        [
            (("acme", "1"), {"total": 3, "version": 3}),
            (("beta", "1"), {"total": 7, "version": 2}),
        ],
    )
    _flush(h)
    rows = _orders(h)
    assert (rows[("acme", "1")]["total"], rows[("acme", "1")]["version"]) == (50, 5)
    assert (rows[("beta", "1")]["total"], rows[("beta", "1")]["version"]) == (7, 2)


def test_composite_misses_load_one_and_many(harness: Harness) -> None:
    """With nothing cached, get and get_many load composite keys from the database (one tenant's id apart from another's) and cache them."""
    h = harness
    _setup(h)
    with h.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO orders (tenant_id, id, total) VALUES ('acme', '1', 10), "
            "('beta', '1', 20), ('a,b', '1', 30)"
        )
    assert h.cache.get("order", ("beta", "1")) == {
        "tenant_id": "beta",
        "id": "1",
        "total": 20,
        "version": 0,
    }
    found = h.cache.get_many("order", [("acme", "1"), ("a,b", "1"), ("a", "b,1"), ("zed", "9")])
    assert [None if r is None else r["total"] for r in found] == [10, 30, None, None]
    entry = h.context.redis.get(h.context.keys.entry("order", "a%2Cb,1"))
    assert entry is not None and json.loads(entry)["total"] == 30


def test_composite_keys_are_refreshed(harness: Harness) -> None:
    """A refresh of composite keys reloads each from the database in one batch, and a key whose row is gone is cached as absent."""
    h = harness
    _setup(h)
    with h.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO orders (tenant_id, id, total) VALUES ('acme', '1', 1), ('beta', '1', 2)"
        )
    h.cache.get_many("order", [("acme", "1"), ("beta", "1")])
    with h.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE orders SET total = total + 100")
        conn.exec_driver_sql("DELETE FROM orders WHERE tenant_id = 'beta'")
    result = refresh_keys(h.context, "order", ["acme,1", "beta,1"])
    assert (result.leased, result.filled, result.batches) == (2, 2, 1)
    assert h.cache.get("order", ("acme", "1")) == {
        "tenant_id": "acme",
        "id": "1",
        "total": 101,
        "version": 0,
    }
    assert h.cache.get("order", ("beta", "1")) is None


@pytest.mark.parametrize("query", [None, "SELECT * FROM items WHERE qty > 0"])
def test_a_warm_run_of_composite_keys_fills_every_key(harness: Harness, query: str | None) -> None:
    """A multi-chunk warm run over an integer composite key (chunk boundaries inside one tenant and across tenants, ordered by the row value) caches every row once, from the table or from the job's own query."""
    h = harness
    job: dict[str, Any] = {"entity": "line", "every": "1h", "chunk_size": 7}
    if query:
        job["query"] = query
    _int_setup(h, all=job)
    rows = [{"tenant_id": t, "id": i, "qty": i} for t in (1, 2, 10) for i in range(1, 11)]
    with h.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO items VALUES (:tenant_id, :id, :qty)"), rows)
    summary = start_run(h.context, "all")
    assert summary["state"] == "done" and summary["rows"] == 30 and summary["chunks"] == 5
    redis, prefix = h.context.redis, h.context.keys.entry_prefix("line")
    names = sorted(n[len(prefix) :] for n in redis.scan_iter(prefix + "*"))
    assert names == sorted(f"{r['tenant_id']},{r['id']}" for r in rows)
    assert h.cache.get("line", (10, 3)) == {"tenant_id": 10, "id": 3, "qty": 3}


def test_integer_parts_have_one_spelling(harness: Harness) -> None:
    """An integer key column refuses another spelling of its part ('01'), so one row never has two entries."""
    h = harness
    _int_setup(h)
    h.cache.write("line", (1, 2), {"qty": 5})
    with pytest.raises(InvalidKey, match="write '1'"):
        h.cache.write("line", ("01", 2), {"qty": 6})
    _flush(h, "line")
    assert h.cache.get("line", ("1", "2")) == {"tenant_id": 1, "id": 2, "qty": 5}


def test_key_columns_without_their_own_unique_constraint_are_refused(harness: Harness) -> None:
    """A key naming only part of a composite primary key is refused at Cache() naming the columns and the fix."""
    h = harness
    _setup(h)
    assert h.settings is not None
    h.configure({"order": ORDER | {"key": "id"}})
    assert h.settings is not None
    with pytest.raises(ConfigError, match=r"ADD UNIQUE \(id\)"):
        Cache(h.settings)
    h.configure({"order": ORDER | {"key": ["id", "version"]}})
    assert h.settings is not None
    with pytest.raises(ConfigError, match=r"columns \(id, version\) together"):
        Cache(h.settings)


def test_a_custom_loader_takes_each_key_column(harness: Harness) -> None:
    """A loader naming :tenant_id and :id loads composite misses one and many; one that names only :key is refused at load, naming the parameters it needs."""
    h = harness
    loader = "SELECT * FROM orders WHERE tenant_id = :tenant_id AND id = :id AND total > 0"
    _setup(h, loader=loader)
    with h.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO orders (tenant_id, id, total) VALUES ('acme', '1', 10), ('beta', '1', 0)"
        )
    assert h.cache.get("order", ("acme", "1")) == {
        "tenant_id": "acme",
        "id": "1",
        "total": 10,
        "version": 0,
    }
    found = h.cache.get_many("order", [("acme", "1"), ("beta", "1")])
    assert [None if r is None else r["total"] for r in found] == [10, None]
    with pytest.raises(ConfigError, match=r"the parameters :tenant_id, :id"):
        h.configure({"order": ORDER | {"loader": "SELECT * FROM orders WHERE id = :key"}})
