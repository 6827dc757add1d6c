"""Fixtures: real Redis, PostgreSQL, MariaDB and SQLite, fresh per test.

Each test gets its own Redis key prefix and Celery queue, and its own
PostgreSQL schema, MariaDB database or SQLite file. Locally a missing server
skips the tests that need it; under CI (CI=true) it fails them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from cachewarden.cache import Cache
from cachewarden.context import Context, set_current
from cachewarden.logs import configure_logging
from cachewarden.settings import Settings, load_settings
from tests.helpers import (
    MARIADB_ADMIN_URL,
    PG_ADMIN_URL,
    REDIS_URL,
    WorkerProcess,
    render_config,
    unique,
)

BACKENDS = ["postgresql", "mariadb", "sqlite"]


_NOT_REACHABLE = "is not reachable"


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} {_NOT_REACHABLE} ({exc}); start it (see ../shared/DESIGN.md)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say, at the end of a local run, how many tests skipped for want of a server."""
    missing: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""
        if _NOT_REACHABLE in reason:
            server = reason.removeprefix("Skipped: ").split(f" {_NOT_REACHABLE}")[0]
            missing[server] = missing.get(server, 0) + 1
    if missing:
        counts = ", ".join(f"{n} for {server}" for server, n in sorted(missing.items()))
        terminalreporter.write_line(
            f"{sum(missing.values())} tests skipped for want of a server ({counts}); "
            "start the servers (see README.md) to run them",
            yellow=True,
            bold=True,
        )


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    configure_logging(fmt="console")


@pytest.fixture(scope="session")
def redis_admin() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unavailable("Redis", exc)
    yield client
    client.close()


@pytest.fixture
def prefix(redis_admin: redis.Redis) -> Iterator[str]:
    """A fresh key prefix; every key under it is deleted afterwards."""
    name = unique("cwt")
    yield name
    for pattern in (f"{name}:*", f"*{name}*"):
        keys = list(redis_admin.scan_iter(pattern, count=1000))
        for i in range(0, len(keys), 500):
            redis_admin.delete(*keys[i : i + 500])


def _pg_database(schema: str) -> Iterator[str]:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def _mariadb_database(name: str) -> Iterator[str]:
    admin = sa.create_engine(MARIADB_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE `{name}`"))
    except sa.exc.OperationalError as exc:
        _unavailable("MariaDB", exc)
    yield MARIADB_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE `{name}`"))
    admin.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database on each of PostgreSQL, MariaDB and SQLite."""
    yield from _database(request.param, tmp_path)


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A fresh PostgreSQL schema."""
    yield from _database("postgresql", tmp_path)


def _database(kind: str, tmp_path: Path) -> Iterator[str]:
    name = unique("cwt")
    if kind == "postgresql":
        yield from _pg_database(name)
    elif kind == "mariadb":
        yield from _mariadb_database(name)
    else:
        yield f"sqlite:///{tmp_path / 'cw.db'}"


class Harness:
    """One test's cachewarden: its config file, clients, tables and workers."""

    def __init__(self, tmp_path: Path, db_url: str, prefix: str) -> None:
        self.tmp_path = tmp_path
        self.db_url = db_url
        self.prefix = prefix
        self.queue = f"{prefix}-q"
        self.config_path = tmp_path / "cachewarden.toml"
        self.engine = sa.create_engine(db_url)
        self.workers: list[WorkerProcess] = []
        self._cache: Cache | None = None
        self._lock = threading.Lock()
        self._context: Context | None = None
        self.settings: Settings | None = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def configure(
        self,
        entities: dict[str, dict[str, Any]],
        write_behind: dict[str, dict[str, Any]] | None = None,
        dispatch_interval: str = "50ms",
        redis_url: str = REDIS_URL,
        db_url: str | None = None,
        requeue_after: str | None = None,
        warming: dict[str, dict[str, Any]] | None = None,
        redis_options: dict[str, Any] | None = None,
        monitoring: dict[str, Any] | None = None,
    ) -> Settings:
        """Write the config file for `entities` and load it."""
        tables: dict[str, dict[str, Any]] = {
            "redis": {"url": redis_url, "prefix": self.prefix, **(redis_options or {})},
            "database": {"url": db_url or self.db_url},
            "celery": {"queue": self.queue},
            "dispatch": {"interval": dispatch_interval}
            | ({"requeue_after": requeue_after} if requeue_after else {}),
        }
        for name, spec in entities.items():
            tables[f"entities.{name}"] = spec
            tables[f"entities.{name}.write_behind"] = (write_behind or {}).get(name, {})
        for name, spec in (warming or {}).items():
            tables[f"warming.{name}"] = spec
        if monitoring:
            tables["monitoring"] = monitoring
        self.config_path.write_text(render_config(tables))
        self.settings = load_settings(self.config_path)
        self._close_clients()
        return self.settings

    def configure_from_file(self) -> Settings:
        """Load the config file as it is now (after a test edited it)."""
        self.settings = load_settings(self.config_path)
        self._close_clients()
        return self.settings

    @property
    def cache(self) -> Cache:
        """The test's one Cache (threads that ask at once share it: no Cache is abandoned)."""
        with self._lock:
            if self._cache is None:
                assert self.settings is not None, "call configure() first"
                self._cache = Cache(self.settings)
            return self._cache

    @property
    def context(self) -> Context:
        if self._context is None:
            assert self.settings is not None, "call configure() first"
            self._context = Context.build(self.settings)
        return self._context

    def create_table(self, name: str, *, version: bool = True, extra: str = "") -> None:
        """CREATE TABLE name (id INTEGER PRIMARY KEY, name VARCHAR NOT NULL, version ...)."""
        cols = ["id INTEGER PRIMARY KEY", "name VARCHAR(200) NOT NULL"]
        if version:
            cols.append("version BIGINT NOT NULL DEFAULT 0")
        if extra:
            cols.append(extra)
        with self.engine.begin() as conn:
            conn.execute(sa.text(f"CREATE TABLE {name} ({', '.join(cols)})"))

    def rows(self, table: str) -> dict[int, dict[str, Any]]:
        """Every row of `table`, keyed by id."""
        with self.engine.connect() as conn:
            result = conn.execute(sa.text(f"SELECT * FROM {table}"))
            return {row["id"]: dict(row) for row in result.mappings()}

    def buffered(self, entity: str = "user") -> int:
        """Writes of `entity` still in its shards' streams (not yet flushed): the shards of
        the count Redis records (both counts' while a reshard drains), not the config's."""
        from cachewarden.writebehind.shardcount import buffered_shards, recorded

        keys, redis = self.context.keys, self.context.redis
        configured = self.context.entity(entity).write_behind.shards
        shards = buffered_shards(recorded(redis, keys, entity), configured)
        return sum(int(redis.xlen(keys.stream(entity, s))) for s in range(shards))

    def count(self, table: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one())

    def worker(self, concurrency: int = 2, start: bool = True, **env: str) -> WorkerProcess:
        """A real Celery worker process on this config (stopped at teardown)."""
        w = WorkerProcess(
            self.config_path,
            self.tmp_path / f"worker-{len(self.workers)}.log",
            concurrency=concurrency,
            env=env,
        )
        self.workers.append(w)
        return w.start() if start else w

    def _close_clients(self) -> None:
        if self._cache is not None:
            self._cache.close()
        if self._context is not None:
            self._context.close()
        self._cache = None
        self._context = None

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self._close_clients()
        self.engine.dispose()
        set_current(None)


@pytest.fixture
def harness(tmp_path: Path, db_url: str, prefix: str) -> Iterator[Harness]:
    """A cachewarden harness on each of PostgreSQL, MariaDB and SQLite."""
    h = Harness(tmp_path, db_url, prefix)
    yield h
    h.close()


@pytest.fixture(params=["postgresql", "mariadb"])
def server_harness(
    request: pytest.FixtureRequest, tmp_path: Path, prefix: str
) -> Iterator[Harness]:
    """A cachewarden harness on each of the servers with row locks: PostgreSQL and MariaDB."""
    for url in _database(request.param, tmp_path):
        h = Harness(tmp_path, url, prefix)
        yield h
        h.close()


@pytest.fixture
def pg_harness(tmp_path: Path, pg_url: str, prefix: str) -> Iterator[Harness]:
    """A cachewarden harness on PostgreSQL only."""
    h = Harness(tmp_path, pg_url, prefix)
    yield h
    h.close()
