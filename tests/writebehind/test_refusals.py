"""A refused write never wins (invariant 3a), on PostgreSQL, MariaDB and SQLite.

Key 1 gets a valid operation at version 5 (a write, or a delete) and a write at
version 7 that the table's CHECK refuses, in either stream order, in one batch or
in two. The database must end with the valid one, the refused one must be a dead
letter, and `get()` must never serve it once the flush has settled. Flushes are
driven by calling `flush_shard` directly, so every step is deterministic.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cachewarden.writebehind.deadletters import list_dead
from cachewarden.writebehind.flush import flush_shard
from tests.conftest import Harness

USER: dict[str, Any] = {"table": "users", "key": "id", "ttl": "10m", "version_column": "version"}
NO_POISON = "CONSTRAINT no_poison CHECK (name <> 'poison')"
POISON = {"name": "poison", "version": 7}


def _setup(h: Harness, batch_size: int) -> None:
    h.create_table("users", version=True, extra=NO_POISON)
    h.configure({"user": USER}, {"user": {"shards": 1, "batch_size": batch_size}})
    h.cache.write("user", 1, {"name": "seed", "version": 3})
    assert flush_shard(h.context, "user", 0).status == "done"
    assert h.rows("users")[1]["name"] == "seed"


def _valid(h: Harness, predecessor: str) -> None:
    if predecessor == "write":
        assert h.cache.write("user", 1, {"name": "five", "version": 5})
    else:
        assert h.cache.delete("user", 1, version=5)


def _flush(h: Harness) -> None:
    result = flush_shard(h.context, "user", 0)
    assert result.status == "done", result.errors


@pytest.mark.parametrize("predecessor", ["write", "delete"])
@pytest.mark.parametrize("order", ["valid-first", "refused-first"])
@pytest.mark.parametrize("batches", [1, 2])
def test_a_refused_newer_write_leaves_the_valid_one_in_the_database_and_the_cache(
    harness: Harness, predecessor: str, order: str, batches: int
) -> None:
    """When the database refuses key 1's v7 and accepts its v5 (a write or a delete), in either stream order and in one batch or two, the database ends with v5, v7 is the one dead letter, and get() serves v5 (or nothing for the delete), never v7."""
    h = harness
    _setup(h, batch_size=1000 if batches == 1 else 1)
    if order == "valid-first":
        _valid(h, predecessor)
        assert h.cache.write("user", 1, POISON)
    else:
        assert h.cache.write("user", 1, POISON)
        _valid(h, predecessor)
    assert h.buffered() == 2
    _flush(h)

    rows = h.rows("users")
    if predecessor == "write":
        assert {k: (r["name"], r["version"]) for k, r in rows.items()} == {1: ("five", 5)}
        assert h.cache.get("user", 1) == {"id": 1, "name": "five", "version": 5}
    else:
        assert rows == {}
        assert h.cache.get("user", 1) is None
    letters = list_dead(h.cache.redis, h.cache.keys, "user")
    assert [(json.loads(x.value)["name"], x.version) for x in letters] == [("poison", "7")]
    assert h.buffered() == 0


def test_a_refused_write_between_two_valid_ones_is_skipped_for_the_older_valid_one(
    harness: Harness,
) -> None:
    """A batch of v4, v6 (refused) and v5 for one key (stream order) leaves v5 in the database and the cache: the refused v6 outranked v5 in coalescing, so v5 is tried in its place and wins over v4."""
    h = harness
    _setup(h, batch_size=1000)
    assert h.cache.write("user", 1, {"name": "four", "version": 4})
    assert h.cache.write("user", 1, {"name": "poison", "version": 6})
    assert h.cache.write("user", 1, {"name": "five", "version": 5})
    _flush(h)
    assert {k: (r["name"], r["version"]) for k, r in h.rows("users").items()} == {1: ("five", 5)}
    assert h.cache.get("user", 1) == {"id": 1, "name": "five", "version": 5}
    assert len(list_dead(h.cache.redis, h.cache.keys, "user")) == 1


def test_every_operation_of_a_key_refused_drops_its_entry_and_keeps_the_old_row(
    harness: Harness,
) -> None:
    """When the database refuses every write of a key in a batch, each one is a dead letter, the row keeps its last accepted value, and get() serves that value again, not a refused one."""
    h = harness
    _setup(h, batch_size=1000)
    assert h.cache.write("user", 1, {"name": "poison", "version": 5})
    assert h.cache.write("user", 1, POISON)
    _flush(h)
    assert h.rows("users")[1]["name"] == "seed"
    assert h.cache.get("user", 1) == {"id": 1, "name": "seed", "version": 3}
    assert len(list_dead(h.cache.redis, h.cache.keys, "user")) == 2
