"""Reflecting an entity's table: names come from the database, never from formatting input.

`EntityTable` is the reflected table plus the one conversion of key text (the
cache key) to the key column's Python type, used by loads and flushes alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sqlalchemy import Column, Engine, MetaData, PrimaryKeyConstraint, Table, UniqueConstraint
from sqlalchemy.exc import DBAPIError, NoSuchTableError

from cachewarden.codec import key_text
from cachewarden.database import unavailable
from cachewarden.errors import ConfigError, InvalidKey
from cachewarden.settings import EntitySettings

# The one spelling of an integer key: ASCII decimal, no sign but a nonzero's '-', no
# leading zero, no '_' (int() would take '007', '1_000' and other scripts' digits too).
_CANONICAL_INT = re.compile(r"(0|-?[1-9][0-9]*)\Z")


@dataclass(frozen=True)
class EntityTable:
    """One entity's reflected table and how its key text becomes a key column value."""

    entity: EntitySettings
    table: Table
    _key_of: Callable[[str], Any]

    @property
    def key_column(self) -> Column[Any]:
        """The key (primary-key) column."""
        return self.table.c[self.entity.key]

    @cached_property
    def columns(self) -> frozenset[str]:
        """The names of the table's columns: a row without some of them is a partial
        write (enqueue merges it into the cached row)."""
        return frozenset(column.name for column in self.table.c)

    @property
    def integer_key(self) -> bool:
        """True when the key column holds integers (its keys have one spelling)."""
        return self._key_of is int

    @property
    def key_type(self) -> type | None:
        """int or str when the key column's value is that type of the key text (the key
        text itself for str), else None (another conversion: UUID, Decimal, ...)."""
        return self._key_of if self._key_of in (int, str) else None

    def key_text(self, key: str | int) -> str:
        """The validated key text (codec.key_text), refusing an integer key's other spellings."""
        text = key_text(self.entity.name, key)
        if self._key_of is int and not isinstance(key, int) and not _CANONICAL_INT.match(text):
            raise InvalidKey(f"{self.entity.name}: {self._not_canonical(text)}")
        return text

    def key_value(self, text: str) -> Any:
        """The key as the key column's Python type; ValueError when it cannot be one."""
        if self._key_of is int:
            if not _CANONICAL_INT.match(text):
                raise ValueError(self._not_canonical(text))
            return int(text)
        try:
            return self._key_of(text)
        except (TypeError, ValueError):
            raise ValueError(
                f"key {text!r} does not fit column {self.entity.key!r} of {self.entity.table!r}"
            ) from None

    def _not_canonical(self, text: str) -> str:
        where = f"the integer column {self.entity.key!r} of {self.entity.table!r}"
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
    for setting, column in (("key", entity.key), ("version_column", entity.version_column)):
        if column is not None and column not in table.c:
            raise ConfigError(
                source,
                f"entities.{entity.name}.{setting}",
                f"column {column!r} is not in table {entity.table!r} "
                f"(it has: {', '.join(table.c.keys())})",
            )
    if not unique_key(table, entity.key):
        raise key_not_unique(source, entity)
    try:
        key_of: Callable[[str], Any] = table.c[entity.key].type.python_type
    except NotImplementedError:
        key_of = str
    return EntityTable(entity, table, key_of)


def unique_key(table: Table, column: str) -> bool:
    """True when `column` alone is the table's primary key, or alone under a unique
    constraint or a unique index that is not partial (what an upsert on it needs)."""
    for constraint in table.constraints:
        if isinstance(constraint, PrimaryKeyConstraint | UniqueConstraint):
            if list(constraint.columns.keys()) == [column]:
                return True
    for index in table.indexes:
        partial = any(
            name.endswith("_where") and value is not None
            for name, value in index.dialect_kwargs.items()
        )
        if index.unique and not partial and [c.name for c in index.columns] == [column]:
            return True
    return False


class KeyNotUnique(ConfigError):
    """An entity's key column has no primary key or unique constraint of its own."""


def key_not_unique(source: str, entity: EntitySettings) -> KeyNotUnique:
    """The error for a key column with no primary key or unique constraint on it."""
    return KeyNotUnique(
        source,
        f"entities.{entity.name}.key",
        f"column {entity.key!r} of table {entity.table!r} is neither its primary key nor "
        "under a unique constraint, so writes could never be upserted: add one "
        f"(ALTER TABLE {entity.table} ADD PRIMARY KEY ({entity.key}), or "
        f"ADD UNIQUE ({entity.key})), or set key to a column that has one",
    )
