"""PostgreSQL's COPY path for a flush: binary COPY into a staging table, then one merge.

A batch's rows go in by psycopg's binary COPY (the columns' own types, dumped in C)
into a temporary staging table that each connection makes once per table shape
(`CREATE TEMP TABLE ... ON COMMIT DELETE ROWS AS SELECT ... WITH NO DATA`: the
columns' types, no constraints), and one `INSERT ... SELECT ... ON CONFLICT ... DO
UPDATE ... WHERE <version guard>` merges them, in the flush's fenced transaction. When
the merge's row count is the batch's, every row was written and nothing more is asked;
otherwise one query over the staging table names the rows the version guard refused
(outranked by a newer version), so no lookup reads the versions back.

Only batches whose every value dumps exactly as the generic statement would bind
it take this path: per column, the Python types the column's type takes as is
(an int for an integer within its range, a str for text, ...). Anything else, and
any batch this path fails on, goes to the array path or the generic one
(sink.py), which isolate bad rows as always.
"""

from __future__ import annotations

import datetime
import uuid
import zlib
from collections.abc import Sequence
from decimal import Decimal
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, Engine, Table
from sqlalchemy.exc import DBAPIError

from cachewarden.settings import EntitySettings
from cachewarden.writebehind.pgarrays import on_conflict

# Below this many rows the array statement (one round trip) costs less than COPY's three.
COPY_MIN_ROWS = 64

_INT_RANGE = {21: 2**15, 23: 2**31, 20: 2**63}  # int2, int4, int8: |value| < range
_TAKES: dict[int, frozenset[type]] = {
    16: frozenset({bool}),
    21: frozenset({int}),
    23: frozenset({int}),
    20: frozenset({int}),
    700: frozenset({float}),
    701: frozenset({float}),
    1700: frozenset({Decimal}),
    25: frozenset({str}),
    1043: frozenset({str}),
    1042: frozenset({str}),
    1082: frozenset({datetime.date}),
    1114: frozenset({datetime.datetime}),
    1184: frozenset({datetime.datetime}),
    1083: frozenset({datetime.time}),
    2950: frozenset({uuid.UUID}),
}
_NONE = type(None)


def _quote(engine: Engine, name: str) -> str:
    return str(engine.dialect.identifier_preparer.quote(name))


class CopyMerge:
    """The COPY path of one reflected table."""

    def __init__(self, engine: Engine, table: Table, entity: EntitySettings) -> None:
        self.engine = engine
        self.table = table
        self.entity = entity
        self.target = engine.dialect.identifier_preparer.format_table(table)
        shape = ",".join(f"{c.name}:{c.type!r}" for c in table.c)
        self.stage = f"cw_stage_{zlib.crc32(f'{self.target}|{shape}'.encode()):08x}"
        self._merges: dict[tuple[str, ...], str] = {}
        self._oids: dict[str, int] | None = None
        self._create_sql = (
            f"CREATE TEMP TABLE IF NOT EXISTS {self.stage} ON COMMIT DELETE ROWS AS "
            f"SELECT * FROM {self.target} WITH NO DATA"
        )

    def apply(
        self,
        conn: Connection,
        columns: tuple[str, ...],
        rows: Sequence[dict[str, Any]],
        reused: bool = False,
    ) -> set[Any] | None:
        """COPY `rows` and merge them: the keys the merge did not write (the version guard
        kept a newer row), or None (nothing done) where a value would not dump exactly as
        the generic statement binds it. `reused`: the staging table was filled before in
        this transaction (it is emptied first). Raises DBAPIError as SQLAlchemy would."""
        raw: Any = conn.connection.driver_connection
        try:
            with raw.cursor() as cur:
                # Every time: a transaction that rolled back took the table's creation with it.
                cur.execute(self._create_sql)
                if self._oids is None:
                    self._oids = self._types(cur)
                types = [self._oids[c] for c in columns]
                pick = itemgetter(*columns)
                if len(columns) > 1:
                    values = [pick(row) for row in rows]
                else:
                    values = [(row[columns[0]],) for row in rows]
                if not _dumpable(types, values):
                    return None
                if reused:
                    cur.execute(f"TRUNCATE {self.stage}")
                names = ", ".join(_quote(self.engine, c) for c in columns)
                with cur.copy(f"COPY {self.stage} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(types)
                    for value in values:
                        copy.write_row(value)
                cur.execute(self._merge(columns))
                lost: set[Any] = set()
                guarded = self.entity.version_column in columns
                if guarded and cur.rowcount != len(values):
                    cur.execute(self._refused(columns))
                    lost = {row[0] for row in cur.fetchall()}
        except Exception as exc:
            import psycopg

            if isinstance(exc, psycopg.Error):
                raise DBAPIError.instance(f"COPY {self.stage}", None, exc, psycopg.Error) from exc
            raise
        return lost

    def _types(self, cur: Any) -> dict[str, int]:
        """The staging table's column types (OIDs), for the binary COPY."""
        cur.execute(
            "SELECT attname, atttypid FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (self.stage,),
        )
        return {str(name): int(oid) for name, oid in cur.fetchall()}

    def _merge(self, columns: tuple[str, ...]) -> str:
        found = self._merges.get(columns)
        if found is not None:
            return found
        key, version = self.entity.key_columns[0], self.entity.version_column
        q = {c: _quote(self.engine, c) for c in columns}
        names = ", ".join(q[c] for c in columns)
        sql = f"INSERT INTO {self.target} ({names}) SELECT {names} FROM {self.stage}"
        sql += on_conflict(q, columns, key, version, self.target)
        self._merges[columns] = sql
        return sql

    def _refused(self, columns: tuple[str, ...]) -> str:
        """The staged keys the merge's version guard refused: after the merge, a written
        row holds its staged version, a refused one another (the newer one)."""
        key, version = self.entity.key_columns[0], self.entity.version_column
        assert version is not None
        k, v = _quote(self.engine, key), _quote(self.engine, version)
        return (
            f"SELECT s.{k} FROM {self.stage} s JOIN {self.target} t ON t.{k} = s.{k} "
            f"WHERE t.{v} IS DISTINCT FROM s.{v}"
        )


def _dumpable(types: list[int], rows: list[tuple[Any, ...]]) -> bool:
    """True when each value is of a Python type its column's binary dumper takes as is.

    Column by column (one transpose), each test a C loop: the types present, then the
    range of an integer column."""
    if not rows:
        return True
    for oid, column in zip(types, zip(*rows, strict=True), strict=True):
        takes = _TAKES.get(oid)
        if takes is None:
            return False
        kinds = set(map(type, column))
        nulls = _NONE in kinds
        kinds.discard(_NONE)
        if not kinds <= takes:
            return False
        bound = _INT_RANGE.get(oid)
        if bound is not None and kinds:
            present = [v for v in column if v is not None] if nulls else column
            if max(present) >= bound or min(present) < -bound:
                return False
    return True
