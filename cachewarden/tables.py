"""Reflecting an entity's table: names come from the database, never from formatting input."""

from __future__ import annotations

from sqlalchemy import Engine, MetaData, Table
from sqlalchemy.exc import DBAPIError, NoSuchTableError

from cachewarden.database import unavailable
from cachewarden.errors import ConfigError
from cachewarden.settings import EntitySettings


def reflect_table(engine: Engine, entity: EntitySettings, source: str) -> Table:
    """The entity's table as the database describes it.

    Raises ConfigError naming the setting when the table, its key column or its
    version column is missing, and BackendUnavailable when the database cannot
    be asked.
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
    return table
