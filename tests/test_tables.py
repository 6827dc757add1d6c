"""Reflected tables: the one conversion of key text to the key column's type."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from cachewarden.cache import Cache
from cachewarden.errors import ConfigError, InvalidKey
from cachewarden.writebehind.flush import flush_shard
from tests.conftest import Harness

USER = {"table": "users", "key": "id", "ttl": "10m"}
OTHER_SPELLINGS = {"007": "7", "1_000": "1000", "\u0663": "3", "+7": "7", "-0": "0"}


def _setup(h: Harness) -> None:
    h.create_table("users", version=False)
    h.configure({"user": USER}, {"user": {"shards": 1}})


@pytest.mark.parametrize("spelling", list(OTHER_SPELLINGS))
def test_an_integer_key_has_one_spelling(pg_harness: Harness, spelling: str) -> None:
    """write, delete and get refuse another spelling of an integer key with InvalidKey naming the canonical one, and send nothing."""
    _setup(pg_harness)
    cache = pg_harness.cache
    canonical = OTHER_SPELLINGS[spelling]
    calls = {
        "write": lambda: cache.write("user", spelling, {"name": "x"}),
        "delete": lambda: cache.delete("user", spelling),
        "get": lambda: cache.get("user", spelling),
    }
    record = cache.keys.shard_count("user")  # written when the Cache was built
    for name, call in calls.items():
        with pytest.raises(InvalidKey, match=f"write '{canonical}'"):
            call()
        assert set(cache.redis.keys(f"{pg_harness.prefix}*")) == {record}, name
    refused = cache.write_many("user", {spelling: {"name": "x"}, 5: {"name": "five"}})
    assert list(refused.refused) == [spelling] and list(refused.taken) == ["5"]
    assert cache.write("user", canonical, {"name": "y"})  # the canonical text is taken


def test_a_non_integer_key_names_the_column(pg_harness: Harness) -> None:
    """A key that is no integer at all is refused naming the integer column it does not fit."""
    _setup(pg_harness)
    with pytest.raises(InvalidKey, match="'abc' is not an integer, as the integer column 'id'"):
        pg_harness.cache.write("user", "abc", {"name": "x"})


def test_a_buffered_other_spelling_is_dead_lettered_not_written_elsewhere(
    pg_harness: Harness,
) -> None:
    """A '1_000' that reached the buffer (a Cache that never reflected) is dead-lettered naming '1000', and row 1000 is untouched."""
    h = pg_harness
    _setup(h)
    assert h.settings is not None
    with Cache(h.settings, reflect=False) as blind:
        blind.write("user", 1000, {"name": "right"})
        blind.write("user", "1_000", {"name": "wrong"})
    assert flush_shard(h.context, "user", 0).status == "done"
    assert h.rows("users") == {1000: {"id": 1000, "name": "right"}}
    ((_, letter),) = h.context.redis.xrange(h.context.keys.dead("user"))
    assert letter["k"] == "1_000" and "write '1000'" in letter["error"]


NOT_UNIQUE = {
    "no primary key": "CREATE TABLE users (id INTEGER NOT NULL, name VARCHAR(200) NOT NULL)",
    "key not the primary key": (
        "CREATE TABLE users (pk INTEGER PRIMARY KEY, id INTEGER NOT NULL, name VARCHAR(200))"
    ),
    "key part of a wider primary key": (
        "CREATE TABLE users (id INTEGER NOT NULL, name VARCHAR(200) NOT NULL, PRIMARY KEY (id, name))"
    ),
}


@pytest.mark.parametrize("case", list(NOT_UNIQUE))
def test_a_key_without_a_unique_constraint_is_refused_at_reflection(
    harness: Harness, case: str
) -> None:
    """Cache() refuses a key column that is neither the primary key nor alone under a unique constraint, with a ConfigError naming the table, the column and the fix."""
    with harness.engine.begin() as conn:
        conn.execute(sa.text(NOT_UNIQUE[case]))
    harness.configure({"user": USER})
    with pytest.raises(ConfigError) as caught:
        harness.cache  # noqa: B018 (builds the Cache, which reflects)
    assert caught.value.field == "entities.user.key"
    assert "column 'id' of table 'users'" in caught.value.problem
    assert (
        "ADD PRIMARY KEY (id)" in caught.value.problem and "ADD UNIQUE (id)" in caught.value.problem
    )


def test_a_unique_key_without_a_primary_key_is_taken(harness: Harness) -> None:
    """A key column under a unique constraint, in a table with no primary key, is reflected and its writes flush."""
    with harness.engine.begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE users (id INTEGER NOT NULL UNIQUE, name VARCHAR(200) NOT NULL)")
        )
    harness.configure({"user": USER}, {"user": {"shards": 1}})
    harness.cache.write("user", 1, {"name": "one"})
    harness.cache.write("user", 1, {"name": "uno"})
    assert flush_shard(harness.context, "user", 0).status == "done"
    assert harness.rows("users") == {1: {"id": 1, "name": "uno"}}


def test_a_key_that_lost_its_constraint_keeps_its_writes_pending(pg_harness: Harness) -> None:
    """A flush into a table whose key lost its primary key after reflection (SQLSTATE 42P10) backs off with a ConfigError naming the fix, dead-letters nothing and keeps the write pending."""
    h = pg_harness
    _setup(h)
    h.cache.write("user", 1, {"name": "one"})
    assert flush_shard(h.context, "user", 0).status == "done"  # the sink is built
    with h.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE users DROP CONSTRAINT users_pkey"))
    h.cache.write("user", 2, {"name": "two"})
    result = flush_shard(h.context, "user", 0)
    assert result.status == "backoff"
    (error,) = result.errors
    assert "entities.user.key" in error and "ADD PRIMARY KEY (id)" in error
    assert "unavailable" not in error
    assert h.buffered() == 1 and h.context.redis.xlen(h.context.keys.dead("user")) == 0
