"""Values the database or its driver cannot take: refused at write() where that is known up
front, else dead-lettered alone while the rest of the batch lands; binary columns round-trip
as "base64:" text."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import sqlalchemy as sa

from cachewarden.errors import InvalidValue
from cachewarden.scripts.writebehind import Pending, WriteScripts
from cachewarden.writebehind.deadletters import DeadLetter, list_dead
from cachewarden.writebehind.flush import flush_shard
from tests.conftest import Harness

USER = {"table": "users", "key": "id", "ttl": "10m"}
ROWS = 80
BAD = 40
# Every byte value, 0x00 and 0xff among them, and a NUL at each end.
BLOB = b"\x00" + bytes(range(256)) + b"\xff\x00"
SMALL = b"\x00\xff\x00"
BINARY = {
    "postgresql": "data BYTEA, small BYTEA",
    "mysql": "data BLOB, small VARBINARY(16)",
    "sqlite": "data BLOB, small BLOB",
}


def _setup(h: Harness, extra: str = "") -> None:
    """A users table (id, name VARCHAR(200) NOT NULL, `extra`) and a one-shard user entity."""
    h.create_table("users", version=False, extra=extra)
    h.configure({"user": USER}, {"user": {"shards": 1}})


def _flush(h: Harness) -> float:
    """Flush the user entity's one shard in this process until it is empty; the seconds taken."""
    started = time.monotonic()
    result = flush_shard(h.context, "user", 0)
    assert result.status == "done", result
    assert h.buffered() == 0
    return time.monotonic() - started


def _dead(h: Harness) -> list[DeadLetter]:
    return list_dead(h.cache.redis, h.cache.keys, "user")


def _cached(h: Harness, key: int) -> Any:
    value = h.cache.redis.get(h.cache.keys.entry("user", str(key)))
    return None if value is None else json.loads(value)


def _stored(h: Harness, key: int) -> dict[str, Any]:
    """The row of `key` as the database holds it (binary columns as bytes)."""
    table = sa.Table("users", sa.MetaData(), autoload_with=h.engine)
    with h.engine.connect() as conn:
        row = conn.execute(sa.select(table).where(table.c.id == key)).mappings().one()
    return {k: bytes(v) if isinstance(v, memoryview) else v for k, v in row.items()}


def _b64(data: bytes) -> str:
    return "base64:" + base64.b64encode(data).decode()


def _raw_enqueue(h: Harness, key: int, value: str) -> None:
    """Buffer a write through the low-level script, past Cache.write's checks (another writer)."""
    spec = h.context.entity("user")
    scripts = WriteScripts(h.context.lua, h.context.keys, spec)
    [reply] = scripts.enqueue([Pending("w", str(key), value, "")])
    assert not str(reply).startswith("!"), reply


def test_write_refuses_a_nul_on_postgresql_and_the_other_rows_land(pg_harness: Harness) -> None:
    """On PostgreSQL, write() refuses a row whose string holds a NUL with an InvalidValue naming the entity, key, column and fix, buffers nothing of it, and the other 79 rows land."""
    h = pg_harness
    _setup(h)
    for i in range(1, ROWS + 1):
        if i == BAD:
            with pytest.raises(InvalidValue) as info:
                h.cache.write("user", i, {"name": "a\x00b"})
            message = str(info.value)
            assert message.startswith(f"user:{BAD}: column 'name' holds a NUL"), message
            assert "PostgreSQL" in message and "replace('\\x00', '')" in message, message
        else:
            h.cache.write("user", i, {"name": f"n{i}"})
    assert h.buffered() == ROWS - 1
    _flush(h)
    rows = h.rows("users")
    assert sorted(rows) == [i for i in range(1, ROWS + 1) if i != BAD]
    assert all(rows[i]["name"] == f"n{i}" for i in rows)
    assert _cached(h, BAD) is None
    assert _dead(h) == []


def test_write_many_refuses_only_the_nul_row_on_postgresql(pg_harness: Harness) -> None:
    """On PostgreSQL, write_many() refuses the one row whose string holds a NUL (in .refused, with InvalidValue) and takes the other 79, which land."""
    h = pg_harness
    _setup(h)
    rows: dict[str | int, dict[str, Any]] = {
        i: {"name": "a\x00b" if i == BAD else f"n{i}"} for i in range(1, ROWS + 1)
    }
    result = h.cache.write_many("user", rows)
    assert list(result.refused) == [str(BAD)]
    assert isinstance(result.refused[str(BAD)], InvalidValue)
    assert len(result.taken) == ROWS - 1 and str(BAD) not in result.taken
    _flush(h)
    assert sorted(h.rows("users")) == [i for i in range(1, ROWS + 1) if i != BAD]


def test_a_literal_backslash_u0000_is_not_taken_for_a_nul(pg_harness: Harness) -> None:
    """On PostgreSQL, a string holding the six characters backslash-u-0-0-0-0 (no NUL) is taken by write() and lands as written."""
    h = pg_harness
    _setup(h)
    h.cache.write("user", 1, {"name": "\\u0000"})
    _flush(h)
    assert h.rows("users")[1]["name"] == "\\u0000"


@pytest.mark.parametrize("db_url", ["mariadb", "sqlite"], indirect=True)
def test_a_nul_lands_where_the_database_stores_it(harness: Harness) -> None:
    """On MariaDB and SQLite, which store a NUL in text, write() takes a string holding one and it lands unchanged."""
    h = harness
    _setup(h)
    h.cache.write("user", 1, {"name": "a\x00b"})
    _flush(h)
    assert h.rows("users")[1]["name"] == "a\x00b"
    assert _dead(h) == []


def test_a_buffered_nul_row_is_dead_lettered_and_the_other_79_land(pg_harness: Harness) -> None:
    """On PostgreSQL, a NUL row buffered past write()'s check among 79 good ones becomes the one dead letter, with psycopg's reason, and the 79 land in one flush that takes under 10 s."""
    h = pg_harness
    _setup(h)
    for i in range(1, ROWS + 1):
        if i == BAD:
            _raw_enqueue(h, i, json.dumps({"id": i, "name": "a\x00b"}))
        else:
            h.cache.write("user", i, {"name": f"n{i}"})
    assert h.buffered() == ROWS

    assert _flush(h) < 10
    rows = h.rows("users")
    assert sorted(rows) == [i for i in range(1, ROWS + 1) if i != BAD]
    assert all(rows[i]["name"] == f"n{i}" for i in rows)
    [letter] = _dead(h)
    assert (letter.op, letter.key) == ("w", str(BAD))
    assert "PostgreSQL text fields cannot contain NUL" in letter.error, letter.error
    assert json.loads(letter.value) == {"id": BAD, "name": "a\x00b"}
    assert _cached(h, BAD) is None


def test_a_value_the_driver_cannot_bind_is_dead_lettered_and_the_rest_land(
    harness: Harness,
) -> None:
    """A JSON object written to a VARCHAR column, which the driver cannot bind (a bare TypeError outside SQLAlchemy's errors on MariaDB, a ProgrammingError on PostgreSQL and SQLite), becomes the one dead letter with the driver's reason and the other 19 rows of its batch land."""
    h = harness
    _setup(h)
    table = sa.Table("users", sa.MetaData(), autoload_with=h.engine)
    with pytest.raises(Exception) as raw, h.engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 0, "name": {"a": 1}}])
    expected = {
        "mysql": TypeError,
        "postgresql": sa.exc.ProgrammingError,
        "sqlite": sa.exc.ProgrammingError,
    }[h.dialect]
    assert type(raw.value) is expected, repr(raw.value)

    for i in range(1, 21):
        h.cache.write("user", i, {"name": {"a": 1} if i == 7 else f"n{i}"})
    _flush(h)
    assert sorted(h.rows("users")) == [i for i in range(1, 21) if i != 7]
    [letter] = _dead(h)
    assert letter.key == "7"
    reason = {
        "mysql": "dict can not be used as parameter",
        "postgresql": "cannot adapt type 'dict'",
        "sqlite": "type 'dict' is not supported",
    }[h.dialect]
    assert reason in letter.error, letter.error


def test_bytes_read_by_get_and_written_back_land_unchanged(harness: Harness) -> None:
    """A row with binary columns holding 0x00 and 0xff, read by get() (which gives them as "base64:" text) and written back with its name changed, lands with the new name and its bytes unchanged."""
    h = harness
    _setup(h, BINARY[h.dialect])
    with h.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO users (id, name, data, small) VALUES (1, 'old', :d, :s)"),
            {"d": BLOB, "s": SMALL},
        )
    row = h.cache.get("user", 1)
    assert row == {
        "id": 1,
        "name": "old",
        "data": _b64(BLOB),
        "small": "base64:AP8A",
    }
    h.cache.write("user", 1, {**row, "name": "new"})
    _flush(h)
    assert _stored(h, 1) == {"id": 1, "name": "new", "data": BLOB, "small": SMALL}
    assert _dead(h) == []


def test_bytes_written_through_the_cache_land_as_bytes(harness: Harness) -> None:
    """write() given Python bytes caches them as "base64:" text and they land in the binary column as the same bytes."""
    h = harness
    _setup(h, BINARY[h.dialect])
    h.cache.write("user", 1, {"name": "a", "data": BLOB, "small": bytearray(SMALL)})
    cached = _cached(h, 1)
    assert (cached["data"], cached["small"]) == (_b64(BLOB), "base64:AP8A")
    _flush(h)
    assert _stored(h, 1) == {"id": 1, "name": "a", "data": BLOB, "small": SMALL}


@pytest.mark.parametrize(
    "value", ["00ff00", "base64:AP8", "base64:AP*A", "base64: AP8A", 255], ids=repr
)
def test_a_malformed_binary_value_is_dead_lettered_naming_the_column(
    harness: Harness, value: object
) -> None:
    """A binary column's value that is not "base64:" and standard padded base64 is dead-lettered with a message naming the column and the expected form, and the other 9 rows land."""
    h = harness
    _setup(h, BINARY[h.dialect])
    for i in range(1, 11):
        h.cache.write("user", i, {"name": f"n{i}", "small": value if i == 3 else SMALL})
    _flush(h)
    assert sorted(h.rows("users")) == [i for i in range(1, 11) if i != 3]
    assert _stored(h, 1)["small"] == SMALL
    [letter] = _dead(h)
    assert letter.key == "3"
    assert "column 'small'" in letter.error and "'base64:'" in letter.error, letter.error


def test_only_an_error_raised_outside_cachewarden_is_taken_for_the_driver_s() -> None:
    """The sink takes a TypeError raised in PyMySQL's code for the driver refusing a value, and not a ValueError raised in cachewarden's own code."""
    from pymysql.converters import escape_item

    from cachewarden.codec import binary_value
    from cachewarden.writebehind.sink import _raised_here

    with pytest.raises(TypeError) as driver:
        escape_item({"a": 1}, "utf8mb4")
    with pytest.raises(ValueError) as ours:
        binary_value("00ff")
    assert _raised_here(driver.value) is False
    assert _raised_here(ours.value) is True
