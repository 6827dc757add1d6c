"""Reflecting an entity's table: names come from the database, never from formatting input.

`EntityTable` is the reflected table plus the one conversion of key text (the
cache key) to the key columns' Python values, used by loads, flushes and warm runs
alike (a composite key's value is a tuple; codec says how its text is written).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    UniqueConstraint,
    tuple_,
)
from sqlalchemy.exc import DBAPIError, NoSuchTableError

from cachewarden.codec import key_parts, key_text
from cachewarden.database import unavailable
from cachewarden.errors import ConfigError, InvalidKey
from cachewarden.settings import EntitySettings

# The one spelling of an integer key: ASCII decimal, no sign but a nonzero's '-', no
# leading zero, no '_' (int() would take '007', '1_000' and other scripts' digits too).
_CANONICAL_INT = re.compile(r"(0|-?[1-9][0-9]*)\Z")


@dataclass(frozen=True)
class EntityTable:
    """One entity's reflected table and how its key text becomes key column values.

    A one-column key's value is the column's Python value; a composite key's is the
    tuple of its columns' values, in the order the entity's `key` names them."""

    entity: EntitySettings
    table: Table
    _key_of: tuple[Callable[[str], Any], ...]

    @property
    def key_column(self) -> Column[Any]:
        """The key column of a one-column key (the first column of a composite one)."""
        return self.table.c[self.entity.key_columns[0]]

    @cached_property
    def key_columns(self) -> tuple[Column[Any], ...]:
        """The key's columns, in the order `key` names them."""
        return tuple(self.table.c[name] for name in self.entity.key_columns)

    @property
    def composite(self) -> bool:
        """True when the key has several columns (its values are tuples)."""
        return len(self._key_of) > 1

    def key_clause(self) -> ColumnElement[Any]:
        """The key as one SQL expression: its column, or the row value (a, b) of its
        columns (comparable with IN, =, < as a tuple on PostgreSQL, MariaDB and SQLite)."""
        columns = self.key_columns
        return columns[0] if len(columns) == 1 else tuple_(*columns)

    def key_of_row(self, row: Mapping[Any, Any]) -> Any:
        """The key value of a row (a mapping by column name)."""
        names = self.entity.key_columns
        return row[names[0]] if len(names) == 1 else tuple(row[n] for n in names)

    @cached_property
    def columns(self) -> frozenset[str]:
        """The names of the table's columns: a row without some of them is a partial
        write (enqueue merges it into the cached row)."""
        return frozenset(column.name for column in self.table.c)

    @property
    def integer_key(self) -> bool:
        """True when the key is one column holding integers (its keys have one spelling)."""
        return self._key_of == (int,)

    @property
    def key_type(self) -> type | None:
        """int or str when the key is one column whose value is that type of the key text
        (the key text itself for str), else None (another conversion: UUID, Decimal, a
        composite key's tuple, ...)."""
        if len(self._key_of) != 1:
            return None
        return self._key_of[0] if self._key_of[0] in (int, str) else None

    def key_text(self, key: Any) -> str:
        """The validated key text (codec.key_text), refusing an integer column's other
        spellings."""
        text = key_text(self.entity.name, key, len(self._key_of))
        parts = key if self.composite else (key,)
        for at, (part, of) in enumerate(zip(parts, self._key_of, strict=True)):
            if of is int and not isinstance(part, int) and not _CANONICAL_INT.match(part):
                raise InvalidKey(f"{self.entity.name}: {self._not_canonical(part, at)}")
        return text

    def key_value(self, text: str) -> Any:
        """The key as the key column's Python value (a tuple of them for a composite
        key); ValueError when it cannot be one."""
        if not self.composite:
            return self._part_value(text, 0)
        parts = key_parts(text, len(self._key_of))
        return tuple(self._part_value(part, at) for at, part in enumerate(parts))

    def text_of(self, value: Any) -> str:
        """The key text of a key value read from the database (key_value's inverse)."""
        if not self.composite:
            return str(value) if type(value) is int else key_text(self.entity.name, str(value))
        parts = [v if type(v) is int else str(v) for v in value]
        return key_text(self.entity.name, parts, len(parts))

    def _part_value(self, text: str, at: int) -> Any:
        of = self._key_of[at]
        if of is int:
            return self._integer(text, at)
        try:
            return of(text)
        except (TypeError, ValueError):
            column = self.entity.key_columns[at]
            raise ValueError(
                f"key {text!r} does not fit column {column!r} of {self.entity.table!r}"
            ) from None

    def _integer(self, text: str, at: int) -> int:
        """The int an integer key column's text spells; ValueError for any spelling but
        the canonical one."""
        if _CANONICAL_INT.match(text):
            return int(text)
        raise ValueError(self._not_canonical(text, at))

    def _not_canonical(self, text: str, at: int) -> str:
        where = f"the integer column {self.entity.key_columns[at]!r} of {self.entity.table!r}"
        try:
            number = int(text)
        except ValueError:
            return f"key {text!r} is not an integer, as {where} needs"
        return f"key {text!r} is not how {where} spells {number}; write {str(number)!r}"


def reflect_table(engine: Engine, entity: EntitySettings, source: str) -> EntityTable:
    """The entity's table as the database describes it.

    Raises ConfigError naming the setting when the table, its key column or its
    version column is missing, or when the key column is neither the primary key nor
    under a unique constraint (the upsert's ON CONFLICT needs one), and
    BackendUnavailable when the database cannot be asked.
    """
    schema, _, name = entity.table.rpartition(".")
    try:
        table = Table(name, MetaData(), autoload_with=engine, schema=schema or None)
    except NoSuchTableError:
        raise ConfigError(
            source,
            f"entities.{entity.name}.table",
            f"table {entity.table!r} does not exist in the database; create it or fix the name",
        ) from None
    except DBAPIError as exc:
        raise unavailable(engine, exc) from exc
    named = [("key", c) for c in entity.key_columns] + [("version_column", entity.version_column)]
    for setting, column in named:
        if column is not None and column not in table.c:
            raise ConfigError(
                source,
                f"entities.{entity.name}.{setting}",
                f"column {column!r} is not in table {entity.table!r} "
                f"(it has: {', '.join(table.c.keys())})",
            )
    if not unique_key(table, entity.key_columns):
        raise key_not_unique(source, entity)
    return EntityTable(entity, table, tuple(_key_of(table.c[c]) for c in entity.key_columns))


def _key_of(column: Column[Any]) -> Callable[[str], Any]:
    """How a key column's value is made from its text: the column's Python type."""
    try:
        of: Callable[[str], Any] = column.type.python_type
    except NotImplementedError:
        return str
    return of


def unique_key(table: Table, columns: tuple[str, ...]) -> bool:
    """True when `columns` (as a set) are the table's primary key, or exactly the
    columns of a unique constraint or of a unique index that is not partial (what an
    upsert on them needs)."""
    wanted = set(columns)
    for constraint in table.constraints:
        if isinstance(constraint, PrimaryKeyConstraint | UniqueConstraint):
            if set(constraint.columns.keys()) == wanted:
                return True
    for index in table.indexes:
        partial = any(
            name.endswith("_where") and value is not None
            for name, value in index.dialect_kwargs.items()
        )
        if index.unique and not partial and {c.name for c in index.columns} == wanted:
            return True
    return False


class KeyNotUnique(ConfigError):
    """An entity's key columns have no primary key or unique constraint of their own."""


def key_not_unique(source: str, entity: EntitySettings) -> KeyNotUnique:
    """The error for a key column with no primary key or unique constraint on it."""
    what = (
        f"column {entity.key_label!r}"
        if not entity.composite
        else f"columns ({entity.key_label}) together"
    )
    return KeyNotUnique(
        source,
        f"entities.{entity.name}.key",
        f"{what} of table {entity.table!r} is neither its primary key nor "
        "under a unique constraint, so writes could never be upserted: add one "
        f"(ALTER TABLE {entity.table} ADD PRIMARY KEY ({entity.key_label}), or "
        f"ADD UNIQUE ({entity.key_label})), or set key to the columns that have one",
    )
