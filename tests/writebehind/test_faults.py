"""Faults that are not bad rows: a read-only database, a lost privilege, a migration, a
table that refuses every row alike. Nothing is dead-lettered for them and nothing is lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from cachewarden.writebehind.deadletters import count_dead
from cachewarden.writebehind.flush import FlushResult, flush_shard
from tests.conftest import Harness
from tests.helpers import PG_ADMIN_URL, unique, wait_for

WRITES = 2_000
USER = {"table": "users", "key": "id", "ttl": "10m"}


@pytest.fixture
def pg_database(tmp_path: Path, prefix: str) -> Iterator[Harness]:
    """A harness on a fresh PostgreSQL database of its own (which the test may make read-only)."""
    name = unique("cwdb")
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    h = Harness(tmp_path, PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", prefix)
    yield h
    h.close()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def _flush(h: Harness) -> list[FlushResult]:
    shards = h.context.entity("user").write_behind.shards
    return [flush_shard(h.context, "user", shard) for shard in range(shards)]


def _dead(h: Harness) -> int:
    return count_dead(h.context.redis, h.context.keys, "user")


def _write_all(h: Harness, round_: int) -> None:
    taken = h.cache.write_many("user", {k: {"name": f"r{round_}-{k}"} for k in range(WRITES)})
    assert not taken.refused


def _assert_cached(h: Harness, round_: int) -> None:
    """Every key's cache entry holds the round's value (none was deleted)."""
    for key in range(0, WRITES, 97):
        assert h.cache.get("user", key) == {"id": key, "name": f"r{round_}-{key}"}


def _terminate(admin: sa.Engine, database: str) -> None:
    with admin.connect() as conn:
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :d AND pid <> pg_backend_pid()"
            ),
            {"d": database},
        )


def test_a_read_only_database_dead_letters_nothing(pg_database: Harness) -> None:
    """With the database switched read-only (sessions terminated), 2,000 writes back off with no dead letter and every cache entry intact, and all land once it is writable."""
    h = pg_database
    h.create_table("users", version=False)
    h.configure({"user": USER}, {"user": {"shards": 2}})
    database = h.engine.url.database
    assert database is not None
    _write_all(h, 0)
    assert {r.status for r in _flush(h)} == {"done"}  # the sink and its fence table are built
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(
                sa.text(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
            )
        _terminate(admin, database)
        _write_all(h, 1)
        results = _flush(h)
        assert {r.status for r in results} == {"backoff"}, results
        assert any("read-only" in e for r in results for e in r.errors), results
        assert _dead(h) == 0 and h.buffered() == WRITES
        _assert_cached(h, 1)
        with admin.connect() as conn:
            conn.execute(
                sa.text(f'ALTER DATABASE "{database}" SET default_transaction_read_only = off')
            )
        _terminate(admin, database)
        assert {r.status for r in _flush(h)} == {"done"}
    finally:
        admin.dispose()
    h.engine.dispose()
    assert _dead(h) == 0 and h.buffered() == 0
    assert h.count("users") == WRITES
    assert h.rows("users")[1234] == {"id": 1234, "name": "r1-1234"}


def test_a_lost_update_privilege_dead_letters_nothing(pg_database: Harness) -> None:
    """While the application's role lacks UPDATE on the table, flushes back off with no dead letter; once granted again, every write lands."""
    h = pg_database
    h.create_table("users", version=False)
    role = unique("cwrole")
    with h.engine.begin() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(sa.text(f'GRANT USAGE, CREATE ON SCHEMA public TO "{role}"'))
        conn.execute(sa.text(f'GRANT SELECT, INSERT, DELETE ON users TO "{role}"'))
    app_url = h.engine.url.set(username=role).render_as_string(hide_password=False)
    h.configure({"user": USER}, {"user": {"shards": 2}}, db_url=app_url)
    try:
        _write_all(h, 1)
        results = _flush(h)
        assert {r.status for r in results} == {"backoff"}, results
        assert any("permission denied" in e for r in results for e in r.errors), results
        assert _dead(h) == 0 and h.buffered() == WRITES
        _assert_cached(h, 1)
        with h.engine.begin() as conn:
            conn.execute(sa.text(f'GRANT UPDATE ON users TO "{role}"'))
        assert {r.status for r in _flush(h)} == {"done"}
        assert _dead(h) == 0 and h.buffered() == 0
        assert h.count("users") == WRITES
    finally:
        h.close()
        with h.engine.begin() as conn:
            conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
            conn.execute(sa.text(f'DROP ROLE "{role}"'))


def test_a_new_column_is_written_without_a_restart(harness: Harness) -> None:
    """Writes carrying a column added by ALTER TABLE after the flusher reflected the table land, with no dead letter, on every dialect."""
    h = harness
    h.create_table("users", version=False)
    h.configure({"user": USER}, {"user": {"shards": 2}})
    h.cache.write("user", 1, {"name": "before"})
    assert {r.status for r in _flush(h)} == {"done"}  # the sink has reflected (id, name)
    with h.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE users ADD COLUMN email VARCHAR(100)"))
    for key in range(2, 12):
        h.cache.write("user", key, {"name": f"n{key}", "email": f"u{key}@example.com"})
    assert {r.status for r in _flush(h)} == {"done"}
    assert _dead(h) == 0 and h.buffered() == 0
    assert h.rows("users")[7] == {"id": 7, "name": "n7", "email": "u7@example.com"}


def test_a_column_that_does_not_exist_is_dead_lettered_naming_it(harness: Harness) -> None:
    """A write whose column is missing even from a fresh reflection is dead-lettered with an error naming the column and the table; the other writes land."""
    h = harness
    h.create_table("users", version=False)
    h.configure({"user": USER}, {"user": {"shards": 1}})
    h.cache.write("user", 1, {"name": "ok"})
    h.cache.write("user", 2, {"name": "bad", "nickname": "x"})
    h.cache.write("user", 3, {"name": "ok too"})
    assert {r.status for r in _flush(h)} == {"done"}
    (letter,) = h.context.redis.xrange(h.context.keys.dead("user"))
    assert "'nickname' is not in table 'users'" in letter[1]["error"]
    assert sorted(h.rows("users")) == [1, 3]


def test_a_table_refusing_every_row_alike_is_a_fault(pg_harness: Harness) -> None:
    """A trigger that refuses every row with one message (SQLSTATE 23514) backs the batch off with no dead letter; with the trigger gone, every write lands."""
    h = pg_harness
    h.create_table("users", version=False)
    with h.engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE FUNCTION frozen() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION USING ERRCODE = '23514', MESSAGE = 'writes are frozen'; END $$"
            )
        )
        conn.execute(
            sa.text(
                "CREATE TRIGGER frozen BEFORE INSERT OR UPDATE ON users "
                "FOR EACH ROW EXECUTE FUNCTION frozen()"
            )
        )
    h.configure({"user": USER}, {"user": {"shards": 1}})
    for key in range(20):
        h.cache.write("user", key, {"name": f"n{key}"})
    (result,) = _flush(h)
    assert result.status == "backoff" and "writes are frozen" in result.errors[0], result
    assert _dead(h) == 0
    with h.engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER frozen ON users"))
    (result,) = _flush(h)
    assert result.status == "done" and _dead(h) == 0 and h.count("users") == 20


@pytest.mark.soak  # a run of 20 s or more under load: .ci/run runs it after make test
def test_a_worker_rides_out_20_s_of_read_only_database_under_load(pg_database: Harness) -> None:
    """With a worker flushing 2,000 writes over time and the database read-only for 20 s (sessions terminated), nothing is dead-lettered, every cache entry keeps its value, and every write lands once it is writable."""
    h = pg_database
    h.create_table("users", version=False)
    h.configure({"user": USER}, {"user": {"max_delay": "200ms", "retry_max": "2s", "shards": 2}})
    database = h.engine.url.database
    assert database is not None
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    h.worker(concurrency=2)

    def read_only(on: bool) -> None:
        with admin.connect() as conn:
            flag = "on" if on else "off"
            conn.execute(
                sa.text(f'ALTER DATABASE "{database}" SET default_transaction_read_only = {flag}')
            )
        _terminate(admin, database)

    try:
        for key in range(500):  # some land before the switch
            h.cache.write("user", key, {"name": f"r1-{key}"})
        wait_for(lambda: h.count("users") > 0, 15, what="writes before the switch")
        read_only(True)
        switched = time.monotonic()
        for key in range(500, WRITES):
            h.cache.write("user", key, {"name": f"r1-{key}"})
        time.sleep(max(0.0, 20 - (time.monotonic() - switched)))  # read-only for 20 s
        assert _dead(h) == 0
        _assert_cached(h, 1)
        read_only(False)
        wait_for(lambda: h.buffered() == 0, 60, what="the buffer to drain")
    finally:
        admin.dispose()
    h.engine.dispose()
    assert _dead(h) == 0 and h.count("users") == WRITES
    assert h.rows("users")[1999] == {"id": 1999, "name": "r1-1999"}


def test_a_column_added_while_writes_flow_lands_within_10_s(server_harness: Harness) -> None:
    """ALTER TABLE ADD COLUMN under a flowing write load, with a worker running: writes carrying the new column land within 10 s, with no restart and no dead letter."""
    h = server_harness
    h.create_table("users", version=False)
    h.configure({"user": USER}, {"user": {"max_delay": "200ms", "shards": 2}})
    h.worker(concurrency=1)
    for key in range(100):
        h.cache.write("user", key, {"name": "before"})
    wait_for(lambda: h.count("users") == 100, 15, what="the writes before the migration")
    with h.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE users ADD COLUMN email VARCHAR(100)"))
    started = time.monotonic()
    for key in range(100, 200):
        h.cache.write("user", key, {"name": "after", "email": f"u{key}@example.com"})

    def landed() -> bool:
        with h.engine.connect() as conn:
            n = conn.execute(sa.text("SELECT COUNT(*) FROM users WHERE email IS NOT NULL"))
            return int(n.scalar_one()) == 100

    wait_for(landed, 10, what="the writes carrying the new column")
    assert time.monotonic() - started <= 10
    assert _dead(h) == 0
