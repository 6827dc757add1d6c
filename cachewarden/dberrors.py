"""The one classifier of database errors: a row the database rejects, or a fault.

Every path that meets a SQLAlchemy error (the flusher's batches, the read
path's loads) asks here. A row error is isolated and dead-lettered; a fault
leaves the work pending and backs off.
"""

from __future__ import annotations

from enum import Enum

from sqlalchemy import Engine
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    ProgrammingError,
    SQLAlchemyError,
    StatementError,
)

from cachewarden.database import database_is_up

ROW_ERRORS = (IntegrityError, DataError, ProgrammingError)

# Lock waits, deadlocks and serialization failures: retried with backoff, never dead-lettered.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014", "57P01"})
_TRANSIENT_MYSQL_CODES = frozenset({1205, 1213, 2006, 2013})


class Kind(Enum):
    """What a database error says about the work that met it."""

    ROW = "row"  # the database refused these rows on their merits
    FAULT = "fault"  # the database (or the way to it) failed: retry the same work later


def classify(engine: Engine, exc: SQLAlchemyError) -> Kind:
    """Whether `exc`, raised by a statement on `engine`, is about its rows or a fault."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or is_transient(exc):
            return Kind.FAULT
        if isinstance(exc, ROW_ERRORS):
            return Kind.ROW
        # Drivers file some row errors (MariaDB CHECK, SQLite type rules) under
        # OperationalError: if the database answers a probe, the data is at fault.
        return Kind.ROW if database_is_up(engine) else Kind.FAULT
    return Kind.ROW if isinstance(exc, StatementError) else Kind.FAULT


def is_transient(exc: DBAPIError) -> bool:
    """True for errors about contention or the connection, not about the rows."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _TRANSIENT_SQLSTATES:
        return True
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _TRANSIENT_MYSQL_CODES:
        return True
    return "database is locked" in str(orig) or "database table is locked" in str(orig)


def first_line(exc: BaseException) -> str:
    """The driver's own message, first line only (SQLAlchemy appends the statement)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
