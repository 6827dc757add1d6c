"""The one classifier of database errors: a row the database rejects, a schema that
moved, or a fault.

Every path that meets a SQLAlchemy error asks here, and the answer comes from
what the database itself said, per dialect: PostgreSQL's SQLSTATE, MySQL's and
MariaDB's error number, SQLite's result code. Only a data or constraint error
(SQLSTATE class 22 or 23 and the equivalents) is about the rows: those are
isolated and dead-lettered. So is a value the driver itself refused before
the statement reached the database (psycopg's DataError for a NUL in text, a
parameter psycopg or sqlite3 cannot adapt): the database never saw it, and
nothing but the value is wrong. A missing column means the table changed under us:
re-reflect and try again. A lock wait that ran out (another transaction holds a
row) is about those rows, but not their data: they wait, the others go on. A
table that lacks what the statement needs, and will lack it on every retry (no
unique constraint for the upsert's ON CONFLICT: SQLSTATE 42P10), is a
configuration error: the work stays pending, and the error says what to fix.
Everything else (a lost connection, a read-only
transaction, a missing privilege or table, a full disk, a lock or serialization
timeout, an error this module does not know) is a fault: the work stays pending
and backs off, and nothing is dead-lettered for it.
"""

from __future__ import annotations

from enum import Enum

from sqlalchemy.exc import DataError, DBAPIError, SQLAlchemyError, StatementError


class Kind(Enum):
    """What a database error says about the work that met it."""

    ROW = "row"  # the database refused these rows on their merits
    SCHEMA = "schema"  # a column the statement names is not in the table: re-reflect
    LOCKED = "locked"  # a row lock held by another transaction outlasted our lock wait
    # The table lacks what the statement needs and no retry will find it (an upsert whose
    # key has no primary key or unique constraint): pending, until the operator fixes it.
    CONFIG = "config"
    FAULT = "fault"  # the database (or the way to it) failed: retry the same work later


# MySQL and MariaDB error numbers of data and constraint errors (SQLSTATE 22xxx and
# 23000, and the strict-mode conversions MySQL files under HY000).
_MYSQL_ROW_ERRORS = frozenset(
    {
        1048,  # column cannot be null
        1062,  # duplicate entry
        1138,  # invalid use of NULL
        1169,  # duplicate unique entry
        1216,  # foreign key: no parent row
        1217,  # foreign key: row is referenced
        1263,  # NULL supplied to a NOT NULL column
        1264,  # out of range value
        1265,  # data truncated
        1292,  # incorrect datetime (or other) value
        1300,  # invalid character string
        1364,  # field has no default value
        1366,  # incorrect value for column
        1367,  # illegal value for type
        1406,  # data too long
        1411,  # incorrect value for a function
        1451,  # foreign key: cannot delete or update a parent row
        1452,  # foreign key: cannot add or update a child row
        1557,  # foreign key would duplicate
        1586,  # duplicate entry for key name
        1690,  # value out of range
        1859,  # duplicate entry in unknown index
        3140,  # invalid JSON text
        3819,  # check constraint violated (MySQL)
        4025,  # CONSTRAINT failed (MariaDB CHECK)
    }
)
_MYSQL_KINDS = {1054: Kind.SCHEMA, 1205: Kind.LOCKED}  # unknown column; lock wait timeout
# undefined_column; lock_timeout; invalid_column_reference ("there is no unique or
# exclusion constraint matching the ON CONFLICT specification").
_SQLSTATE_KINDS = {"42703": Kind.SCHEMA, "55P03": Kind.LOCKED, "42P10": Kind.CONFIG}

# SQLite primary result codes (the extended code's low byte).
_SQLITE_ROW_ERRORS = frozenset({18, 19, 20})  # TOOBIG, CONSTRAINT, MISMATCH
_SQLITE_ERROR = 1
_SQLITE_UNKNOWN_COLUMN = ("no such column", "has no column named")
# SQLite's 42P10: "ON CONFLICT clause does not match any PRIMARY KEY or UNIQUE constraint".
# MySQL and MariaDB have no kin: ON DUPLICATE KEY UPDATE without a unique key inserts a
# second row instead of failing, so only the check at reflection (tables.py) stops it.
_SQLITE_NO_CONFLICT_TARGET = "does not match any PRIMARY KEY or UNIQUE constraint"

# A driver's own refusal of a parameter it could not bind (no SQLSTATE, error number or
# result code: the statement never reached the database). psycopg: "cannot adapt type
# 'dict' using placeholder '%s'"; sqlite3: "Error binding parameter 1: type 'dict' is
# not supported" (before Python 3.11: "... - probably unsupported type.").
_BIND_REFUSALS = ("cannot adapt type", "Error binding parameter")


def classify(exc: SQLAlchemyError) -> Kind:
    """Whether `exc` is about the rows of its statement, the table's shape, a row lock,
    the table's configuration, or a fault."""
    if not isinstance(exc, DBAPIError):
        # Parameters the driver could not take (a value of the wrong Python type):
        # raised before the statement ran, so about the row.
        return Kind.ROW if isinstance(exc, StatementError) else Kind.FAULT
    if exc.connection_invalidated:
        return Kind.FAULT
    orig = exc.orig
    errno = _mysql_errno(orig)
    if errno is not None:
        return _MYSQL_KINDS.get(errno, Kind.ROW if errno in _MYSQL_ROW_ERRORS else Kind.FAULT)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        if sqlstate[:2] in ("22", "23"):
            return Kind.ROW
        return _SQLSTATE_KINDS.get(sqlstate, Kind.FAULT)
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        if code & 0xFF in _SQLITE_ROW_ERRORS:
            return Kind.ROW
        if code == _SQLITE_ERROR and any(s in str(orig) for s in _SQLITE_UNKNOWN_COLUMN):
            return Kind.SCHEMA
        if code == _SQLITE_ERROR and _SQLITE_NO_CONFLICT_TARGET in str(orig):
            return Kind.CONFIG
        return Kind.FAULT
    return Kind.ROW if _driver_refused_value(exc) else Kind.FAULT


def _driver_refused_value(exc: DBAPIError) -> bool:
    """True when the driver, not the database, refused a value of the statement's
    parameters: a DB-API DataError ("problems with the processed data") that carries
    no database code, or a parameter the driver could not bind."""
    if isinstance(exc, DataError):
        return True
    text = str(exc.orig)
    return any(s in text for s in _BIND_REFUSALS)


def _mysql_errno(orig: object) -> int | None:
    """The MySQL/MariaDB error number of a driver exception, if it is one."""
    module = type(orig).__module__
    if not module.startswith(("pymysql", "MySQLdb", "mysql", "mariadb")):
        return None
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    errno = getattr(orig, "errno", None)
    return errno if isinstance(errno, int) else None


def first_line(exc: BaseException) -> str:
    """The driver's own message, first line only (SQLAlchemy appends the statement)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def driver_text(exc: BaseException) -> str:
    """The driver's whole message (on PostgreSQL its DETAIL names the failing row)."""
    return str(getattr(exc, "orig", None) or exc).strip()
