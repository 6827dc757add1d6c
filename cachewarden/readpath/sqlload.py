"""Loading rows from the application's database with SQLAlchemy.

By default a row is read by primary key from the entity's reflected table;
a batch is one `SELECT ... WHERE key IN (...)`. An entity's `loader` SQL
(a query taking `:key`, e.g. `SELECT * FROM load_user(:key)`) replaces the
single-key read; a batch then runs it once per key on one connection.
Values are made JSON-friendly here (`jsonable`: dates, times, decimals and UUIDs
as exact text, binary values as "base64:" text, the codec's forms), so a loaded
row reads like one the application wrote and can be written back as it is.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, and_, any_, bindparam, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql import Executable

from cachewarden.codec import exact_text
from cachewarden.context import Context
from cachewarden.dberrors import first_line
from cachewarden.errors import BackendUnavailable, LoadFailed
from cachewarden.settings import EntitySettings
from cachewarden.tables import EntityTable

Row = dict[str, Any]
_PLAIN = (str, int, float, bool, type(None))
_PLAIN_TYPES = frozenset(_PLAIN)
# Values written as the codec's exact text (binary ones as "base64:" text).
_EXACT = (datetime.date, datetime.time, uuid.UUID, bytes, bytearray, memoryview)


class SqlLoader:
    """Reads one entity's rows: one key, or a batch of keys."""

    def __init__(self, engine: Engine, entity: EntitySettings, reflected: EntityTable) -> None:
        self.engine = engine
        self.entity = entity
        self.reflected = reflected
        self.table = reflected.table
        key_column = reflected.key_column
        self._names: tuple[str, ...] = ("key",) if not reflected.composite else entity.key_columns
        match = and_(
            *(c == bindparam(n) for c, n in zip(reflected.key_columns, self._names, strict=True))
        )
        self._one: Executable = (
            text(entity.loader).bindparams(*(bindparam(n) for n in self._names))
            if entity.loader
            else select(self.table).where(match)
        )
        if reflected.composite:
            clause = reflected.key_clause()
            self._many = select(self.table).where(clause.in_(bindparam("keys", expanding=True)))
        elif engine.dialect.name == "postgresql":
            # One array parameter: the statement stays the same whatever the batch size.
            from sqlalchemy.dialects.postgresql import ARRAY

            keys = bindparam("keys", type_=ARRAY(key_column.type))
            self._many = select(self.table).where(key_column == any_(keys))
        else:
            self._many = select(self.table).where(key_column.in_(bindparam("keys", expanding=True)))

    def load(self, key: str) -> Row | None:
        """The row of `key`, or None where the database has none. Raises LoadFailed."""
        value = self._key_value(key)
        if value is None:
            return None
        try:
            with self.engine.connect() as conn:
                row = conn.execute(self._one, self._params(value)).mappings().first()
        except SQLAlchemyError as exc:
            raise self._failed(key, exc) from exc
        return None if row is None else jsonable(row)

    def load_many(self, keys: Sequence[str]) -> dict[str, Row]:
        """The rows of those `keys` that exist, by key. Raises LoadFailed naming the keys."""
        values = {k: v for k in keys if (v := self._key_value(k)) is not None}
        if not values:
            return {}
        try:
            with self.engine.connect() as conn:
                if self.entity.loader:
                    return self._each(conn, values)
                result = conn.execute(self._many, {"keys": list(values.values())})
                columns = list(result.keys())
                by_value = {v: k for k, v in values.items()}
                key_of = self.reflected.key_of_row
                text_of = self.reflected.text_of if self.reflected.composite else str
                found = {}
                for row in result:
                    mapped = dict(zip(columns, row, strict=True))
                    value = key_of(mapped)
                    found[by_value.get(value) or text_of(value)] = jsonable(mapped)
                return found
        except SQLAlchemyError as exc:
            named = keys[0] if len(keys) == 1 else f"{keys[0]} (and {len(keys) - 1} more)"
            raise self._failed(named, exc) from exc

    def _each(self, conn: Connection, values: Mapping[str, Any]) -> dict[str, Row]:
        found: dict[str, Row] = {}
        for key, value in values.items():
            row = conn.execute(self._one, self._params(value)).mappings().first()
            if row is not None:
                found[key] = jsonable(row)
        return found

    def _params(self, value: Any) -> dict[str, Any]:
        """The statement's key parameters: {"key": value}, or one per key column."""
        if len(self._names) == 1:
            return {"key": value}
        return dict(zip(self._names, value, strict=True))

    def _key_value(self, key: str) -> Any:
        """The key as the column's Python type; None when it cannot be one (no such row)."""
        try:
            return self.reflected.key_value(key)
        except ValueError:
            return None

    def _failed(self, key: str, exc: SQLAlchemyError) -> LoadFailed:
        problem = first_line(exc)
        return LoadFailed(self.entity.name, key, f"loading from the database failed: {problem}")


def jsonable(row: Mapping[Any, Any]) -> Row:
    """The row with values JSON can carry: dates, times, decimals and UUIDs as exact text,
    binary values (bytes, bytearray, memoryview) as "base64:" text (codec.exact_text)."""
    if all(type(v) in _PLAIN_TYPES for v in row.values()):
        return {str(k): v for k, v in row.items()}
    out: Row = {}
    for column, value in row.items():
        if not isinstance(value, _PLAIN):
            value = _convert(value)
        out[str(column)] = value
    return out


def _convert(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # every digit (and PostgreSQL's 'NaN' as the text it is)
    if isinstance(value, _EXACT):
        return exact_text(value)
    if isinstance(value, list | tuple):
        return [v if isinstance(v, _PLAIN) else _convert(v) for v in value]
    if isinstance(value, dict):
        return jsonable(value)
    return str(value)


def loader_for(context: Context, entity: str) -> SqlLoader:
    """The context's loader of `entity`, built (and its table reflected) once per process.

    Raises LoadFailed naming the table when it cannot be reflected (the database is down).
    """
    spec = context.entity(entity)

    def build() -> SqlLoader:
        try:
            table = context.table(entity)
        except BackendUnavailable as exc:
            problem = f"cannot read table {spec.table!r}: {exc}"
            raise LoadFailed(spec.name, "*", problem) from exc
        return SqlLoader(context.engine, spec, table)

    return context.shared("loader", entity, build)
