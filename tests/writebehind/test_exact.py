"""Exact values: decimals keep every digit and datetimes, dates, times and UUIDs land in
their columns, written and loaded through the cache."""

from __future__ import annotations

import datetime
import uuid
from decimal import Decimal

import sqlalchemy as sa

from cachewarden.writebehind.flush import flush_shard
from tests.conftest import Harness

AMOUNT = Decimal("12345678901234567890.0123456789")  # 30 significant digits
AT = datetime.datetime(2026, 12, 1, 23, 4, 5, 678901)
DAY = datetime.date(2026, 2, 28)
TOD = datetime.time(7, 8, 9, 123456)
REF = uuid.UUID("12345678-1234-5678-1234-567812345678")
COLUMNS = {
    "postgresql": "amount NUMERIC(30,10), at TIMESTAMP, day DATE, tod TIME, ref UUID",
    "mysql": "amount DECIMAL(30,10), at DATETIME(6), day DATE, tod TIME(6), ref UUID",
    # SQLite keeps NUMERIC as a float (its own rule), so its decimal is not checked.
    "sqlite": "amount NUMERIC(30,10), at TIMESTAMP, day DATE, tod TIME, ref CHAR(36)",
}


def test_exact_values_are_written_and_loaded_with_every_digit(harness: Harness) -> None:
    """A Decimal of 30 digits, a datetime, a date, a time and a UUID written through the cache land in typed columns as they were, and a load caches their exact text."""
    h = harness
    h.create_table("users", version=False, extra=COLUMNS[h.dialect])
    h.configure({"user": {"table": "users", "key": "id", "ttl": "10m"}}, {"user": {"shards": 1}})
    row = {"name": "a", "amount": AMOUNT, "at": AT, "day": DAY, "tod": TOD, "ref": REF}
    h.cache.write("user", 1, row)
    assert flush_shard(h.context, "user", 0).status == "done"
    table = sa.Table("users", sa.MetaData(), autoload_with=h.engine)
    with h.engine.connect() as conn:
        stored = dict(conn.execute(sa.select(table)).mappings().one())
    if h.dialect == "sqlite":
        stored["ref"] = uuid.UUID(stored["ref"])
    else:
        assert stored["amount"] == AMOUNT
    assert (stored["at"], stored["day"], stored["tod"], stored["ref"]) == (AT, DAY, TOD, REF)

    h.cache.redis.delete(h.cache.keys.entry("user", "1"))
    loaded = h.cache.get("user", 1)
    assert loaded is not None
    expected = {
        "at": "2026-12-01T23:04:05.678901",
        "day": "2026-02-28",
        "tod": "07:08:09.123456",
        "ref": str(REF),
    }
    if h.dialect != "sqlite":
        expected["amount"] = "12345678901234567890.0123456789"
    assert {k: loaded[k] for k in expected} == expected
