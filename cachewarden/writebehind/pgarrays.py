"""PostgreSQL's fast path for a flush: one array parameter per column.

One `INSERT ... SELECT * FROM unnest(arrays) ON CONFLICT ...` per batch and one
`key = ANY(array)` version lookup, instead of a statement per row. Each array is
cast to exactly the type the generic statement binds its parameter as; anything
that could convert differently is left to the generic path (sink.py), which
also takes any batch this path fails on, so bad rows are isolated the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Table, bindparam
from sqlalchemy.sql import sqltypes

from cachewarden.settings import EntitySettings

# Statements go to psycopg as written (exec_driver_sql), so arrays travel in binary ("%(c0)b").

_CAST_KINDS = frozenset({int, float, str, bool})  # Python types sent under an explicit cast
_PLAIN_KINDS = frozenset({int, float, bool})  # ... and those the driver may type itself


def _quote(dialect: Any, name: str) -> str:
    return str(dialect.identifier_preparer.quote(name)).replace("%", "%%")


@dataclass(frozen=True)
class ArrayColumn:
    """How one column's values travel as a single PostgreSQL array parameter.

    The array is cast to the very type the generic statement casts each parameter to,
    so each element converts as that parameter would; where the generic statement
    casts nothing, the driver types the array and the INSERT applies the same
    assignment cast. Values that might convert differently (mixed Python types,
    anything but int/float/str/bool) are refused: the generic statement takes them.
    """

    name: str
    quoted: str
    cast: str  # "" when the generic statement sends the parameter without a cast
    adapt: Callable[[Any], Any] | None  # what the generic path does to each value first

    def sql(self, param: str) -> str:
        return f"CAST(%({param})b AS {self.cast}[])" if self.cast else f"%({param})b"

    def values(self, column: list[Any]) -> list[Any] | None:
        """The values ready to bind as one array, or None when they must go one by one."""
        if self.adapt is not None:
            try:
                column = [self.adapt(v) for v in column]
            except Exception:  # the generic path meets the same error and reports it
                return None
        kinds = set(map(type, column))
        kinds.discard(type(None))
        if len(kinds) > 1 or not kinds <= (_CAST_KINDS if self.cast else _PLAIN_KINDS):
            return None
        if not kinds and not self.cast:
            return None  # all NULL and nothing says of which type
        return column


def _array_column(engine: Engine, table: Table, name: str) -> ArrayColumn | None:
    """The array form of column `name`, or None where unnest would not carry it."""
    dialect = engine.dialect
    col_type = table.c[name].type
    if isinstance(col_type, sqltypes.ARRAY):
        return None  # unnest flattens nested arrays
    # The cast the generic statement renders after this column's parameter ("::VARCHAR").
    cast = str(bindparam("v", type_=col_type).compile(dialect=dialect)).partition("::")[2]
    if cast.endswith("]") or "%" in cast:
        return None
    adapt: Callable[[Any], Any] | None
    if isinstance(col_type, sqltypes.JSON):
        if not cast:
            return None
        # The generic path wraps values for psycopg, which dumps them with this function.
        dumps: Callable[[Any], str] = getattr(dialect, "_json_serializer", None) or json.dumps
        none_as_null = bool(col_type.none_as_null)

        def adapt(value: Any) -> Any:
            return None if value is None and none_as_null else dumps(value)
    else:
        adapt = col_type.dialect_impl(dialect).bind_processor(dialect)
    return ArrayColumn(name, _quote(dialect, name), cast, adapt)


@dataclass(frozen=True)
class UnnestUpsert:
    """INSERT ... SELECT * FROM unnest(<one array per column>) ON CONFLICT ...: the generic
    upsert's statement, with the same conflict target, assignments and version guard."""

    sql: str
    columns: tuple[ArrayColumn, ...]

    def params(self, rows: list[dict[str, Any]]) -> dict[str, list[Any]] | None:
        params: dict[str, list[Any]] = {}
        for i, column in enumerate(self.columns):
            values = column.values([row[column.name] for row in rows])
            if values is None:
                return None
            params[f"c{i}"] = values
        return params


def build_unnest(
    engine: Engine, table: Table, columns: tuple[str, ...], entity: EntitySettings
) -> UnnestUpsert | None:
    arrays = [_array_column(engine, table, name) for name in columns]
    cols = tuple(a for a in arrays if a is not None)
    key, version = entity.key_columns[0], entity.version_column
    if len(cols) != len(columns) or key not in columns:
        return None
    q = {c.name: c.quoted for c in cols}
    target = engine.dialect.identifier_preparer.format_table(table).replace("%", "%%")
    sql = (
        f"INSERT INTO {target} ({', '.join(c.quoted for c in cols)}) "
        f"SELECT * FROM unnest({', '.join(c.sql(f'c{i}') for i, c in enumerate(cols))})"
    )
    return UnnestUpsert(sql + on_conflict(q, columns, key, version, target), cols)


def on_conflict(
    quoted: dict[str, str], columns: tuple[str, ...], key: str, version: str | None, target: str
) -> str:
    """The upsert's tail, as the generic statement has it: on a conflict of the key,
    set every other column, where a version column guards the row (the newer wins)."""
    updated = [c for c in columns if c != key]
    if not updated:
        return f" ON CONFLICT ({quoted[key]}) DO NOTHING"
    sets = ", ".join(f"{quoted[c]} = EXCLUDED.{quoted[c]}" for c in updated)
    tail = f" ON CONFLICT ({quoted[key]}) DO UPDATE SET {sets}"
    if version is not None and version in columns:
        tail += f" WHERE {target}.{quoted[version]} <= EXCLUDED.{quoted[version]}"
    return tail


@dataclass(frozen=True)
class VersionLookup:
    """SELECT key, version ... WHERE key = ANY(<one array>): the generic `key IN (...)`
    query, for key and version columns whose values SQLAlchemy hands over untouched."""

    sql: str
    key: ArrayColumn

    def run(self, conn: Connection, keys: list[Any]) -> Sequence[Any] | None:
        values = self.key.values(keys)
        if values is None:
            return None
        return conn.exec_driver_sql(self.sql, {"keys": values}).all()


def build_lookup(engine: Engine, table: Table, entity: EntitySettings) -> VersionLookup | None:
    if entity.version_column is None:
        return None
    for name in (entity.key_columns[0], entity.version_column):
        col_type = table.c[name].type
        if not isinstance(col_type, sqltypes.Integer | sqltypes.String) or isinstance(
            col_type, sqltypes.Enum
        ):
            return None
        if col_type.dialect_impl(engine.dialect).result_processor(engine.dialect, None):
            return None
    key = _array_column(engine, table, entity.key_columns[0])
    if key is None or not key.cast:
        return None
    version = _quote(engine.dialect, entity.version_column)
    target = engine.dialect.identifier_preparer.format_table(table).replace("%", "%%")
    return VersionLookup(
        f"SELECT {key.quoted}, {version} FROM {target} WHERE {key.quoted} = ANY({key.sql('keys')})",
        key,
    )
