"""The one classifier of database errors, fed the real errors of PostgreSQL, MariaDB and SQLite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from cachewarden.dberrors import Kind, classify
from tests.conftest import BACKENDS, _database

_SQLITE_CHECK = "name <> 'bad' AND length(name) <= 5"
DDL = "CREATE TABLE t (id INTEGER PRIMARY KEY, name VARCHAR(5) NOT NULL CHECK (name <> 'bad'))"


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """A fresh database on each dialect with table t (id, name VARCHAR(5) NOT NULL, no 'bad')."""
    for url in _database(request.param, tmp_path):
        eng = sa.create_engine(url)
        # SQLite checks types only in a STRICT table, whose types are SQLite's own; its
        # way to bound a length is a CHECK.
        sqlite = DDL.replace("VARCHAR(5)", "TEXT").replace("name <> 'bad'", _SQLITE_CHECK)
        ddl = sqlite + " STRICT" if eng.dialect.name == "sqlite" else DDL
        with eng.begin() as conn:
            conn.execute(sa.text(ddl))
            conn.execute(sa.text("INSERT INTO t VALUES (1, 'a')"))
        yield eng
        eng.dispose()


def _error(engine: sa.Engine, *statements: str) -> SQLAlchemyError:
    """The error the last of `statements` raises, run in one transaction."""
    with pytest.raises(SQLAlchemyError) as caught, engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))
    return caught.value


ROW_ERRORS: dict[str, Callable[[str], str]] = {
    "not null": lambda d: "INSERT INTO t (id, name) VALUES (2, NULL)",
    "check constraint": lambda d: "INSERT INTO t (id, name) VALUES (2, 'bad')",
    "duplicate key": lambda d: "INSERT INTO t (id, name) VALUES (1, 'b')",
    "value too long": lambda d: "INSERT INTO t (id, name) VALUES (2, 'toolong')",
    "wrong type": lambda d: "INSERT INTO t (id, name) VALUES ('x', 'b')",
}


@pytest.mark.parametrize("case", list(ROW_ERRORS))
def test_data_and_constraint_errors_are_about_the_row(engine: sa.Engine, case: str) -> None:
    """A NULL, CHECK, duplicate, too-long or mistyped value is a row error on every dialect."""
    assert classify(_error(engine, ROW_ERRORS[case](engine.dialect.name))) is Kind.ROW


def test_an_unknown_column_is_a_schema_change(engine: sa.Engine) -> None:
    """A statement naming a column the table lacks is classified SCHEMA (re-reflect), on every dialect."""
    assert classify(_error(engine, "INSERT INTO t (id, name, email) VALUES (2, 'b', 'c')")) is (
        Kind.SCHEMA
    )


def test_a_missing_table_is_a_fault(engine: sa.Engine) -> None:
    """A statement on a table that does not exist is a fault, not a row error."""
    assert classify(_error(engine, "INSERT INTO nope (id) VALUES (1)")) is Kind.FAULT


def test_a_read_only_transaction_is_a_fault(engine: sa.Engine) -> None:
    """A write refused because the database or transaction is read-only is a fault on every dialect."""
    if engine.dialect.name == "sqlite":
        path = engine.url.database
        readonly = sa.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
        exc = _error(readonly, "INSERT INTO t (id, name) VALUES (2, 'b')")
        readonly.dispose()
    else:
        begin = {
            "postgresql": "SET TRANSACTION READ ONLY",
            "mysql": "SET TRANSACTION READ ONLY",
        }[engine.dialect.name]
        exc = _error(engine, begin, "INSERT INTO t (id, name) VALUES (2, 'b')")
    assert classify(exc) is Kind.FAULT


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_a_lock_timeout_is_about_locked_rows(kind: str, tmp_path: Path) -> None:
    """A statement that gave up waiting for another transaction's row lock is classified LOCKED (those rows wait), not a row error."""
    for url in _database(kind, tmp_path):
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text(DDL))
            conn.execute(sa.text("INSERT INTO t VALUES (1, 'a')"))
        wait = {
            "postgresql": "SET LOCAL lock_timeout = '100ms'",
            "mysql": "SET SESSION innodb_lock_wait_timeout = 1",
        }[engine.dialect.name]
        with engine.connect() as holder:
            holder.begin()
            holder.execute(sa.text("UPDATE t SET name = 'h' WHERE id = 1"))
            exc = _error(engine, wait, "UPDATE t SET name = 'w' WHERE id = 1")
            holder.rollback()
        engine.dispose()
        assert classify(exc) is Kind.LOCKED


def test_a_busy_sqlite_database_is_a_fault(tmp_path: Path) -> None:
    """SQLite's "database is locked" (it locks the whole file), after its busy timeout, is a fault."""
    path = tmp_path / "busy.db"
    eng = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
    with eng.begin() as conn:
        conn.execute(sa.text(DDL))
    with eng.connect() as holder:
        holder.exec_driver_sql("BEGIN IMMEDIATE")
        other = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
        exc = _error(other, "INSERT INTO t (id, name) VALUES (2, 'b')")
        other.dispose()
        holder.rollback()
    eng.dispose()
    assert "locked" in str(exc) and classify(exc) is Kind.FAULT


def test_a_missing_privilege_is_a_fault(pg_url: str) -> None:
    """A role that lost its UPDATE privilege gets a fault (42501) from an upsert, not a row error."""
    admin = sa.create_engine(pg_url)
    role = pg_url.rsplit("search_path%3D", 1)[1] + "_app"
    with admin.begin() as conn:
        conn.execute(sa.text(DDL))
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(sa.text(f'GRANT USAGE ON SCHEMA "{role[:-4]}" TO "{role}"'))
        conn.execute(sa.text(f'GRANT SELECT, INSERT ON t TO "{role}"'))
    app = sa.create_engine(sa.make_url(pg_url).set(username=role))
    try:
        exc = _error(
            app,
            "INSERT INTO t (id, name) VALUES (1, 'b') ON CONFLICT (id) DO UPDATE SET name = 'b'",
        )
        assert classify(exc) is Kind.FAULT
    finally:
        app.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text("DROP TABLE t"))
            conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
            conn.execute(sa.text(f'DROP ROLE "{role}"'))
        admin.dispose()


def test_a_lost_connection_is_a_fault(pg_url: str) -> None:
    """A statement whose session the server terminated is a fault."""
    eng = sa.create_engine(pg_url)
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with admin.connect() as a:
            a.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(SQLAlchemyError) as caught:
            conn.execute(sa.text("SELECT 1"))
    eng.dispose()
    admin.dispose()
    assert classify(caught.value) is Kind.FAULT


def test_a_nul_refused_by_psycopg_is_about_the_row(pg_url: str) -> None:
    """psycopg's refusal of a NUL in a text parameter, a client-side DataError carrying no SQLSTATE, is a row error."""
    import psycopg

    eng = sa.create_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(sa.text(DDL.replace("VARCHAR(5)", "TEXT")))
    with pytest.raises(SQLAlchemyError) as caught, eng.begin() as conn:
        conn.execute(sa.text("INSERT INTO t (id, name) VALUES (2, :n)"), {"n": "a\x00b"})
    eng.dispose()
    exc = caught.value
    assert isinstance(exc, sa.exc.DBAPIError) and type(exc.orig) is psycopg.DataError
    assert exc.orig.sqlstate is None and "NUL" in str(exc.orig)
    assert classify(exc) is Kind.ROW


def test_a_parameter_the_driver_cannot_bind_is_about_the_row(engine: sa.Engine) -> None:
    """A parameter psycopg or sqlite3 cannot adapt (a dict for a text column) is a row error; PyMySQL raises a bare TypeError outside SQLAlchemy's errors for it instead."""
    insert = "INSERT INTO t (id, name) VALUES (2, :n)"
    with pytest.raises(Exception) as caught, engine.begin() as conn:
        conn.execute(sa.text(insert), {"n": {"a": 1}})
    exc = caught.value
    if engine.dialect.name == "mysql":
        assert type(exc) is TypeError
    else:
        assert isinstance(exc, sa.exc.DBAPIError), repr(exc)
        assert classify(exc) is Kind.ROW


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_an_upsert_on_a_key_with_no_unique_constraint_is_a_config_error(
    kind: str, tmp_path: Path
) -> None:
    """An ON CONFLICT on a column with no unique constraint (PostgreSQL's 42P10, SQLite's kin) is classified CONFIG, not a fault or a row error."""
    for url in _database(kind, tmp_path):
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE n (id INTEGER NOT NULL, name VARCHAR(5))"))
        exc = _error(
            engine,
            "INSERT INTO n (id, name) VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET name = 'a'",
        )
        engine.dispose()
        assert classify(exc) is Kind.CONFIG
