"""One process's resources: the Redis client, keyspace, scripts, engine and tables.

Built after fork (a prefork Celery child builds its own), never at import, and
shared by `Cache` and the worker in that process. Each table is reflected once
per process and entity, never twice at once. This module is the only one that
keeps a context in global state (`current()`).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from redis import Redis
from sqlalchemy import Engine

from cachewarden.codec import Key, key_text
from cachewarden.connections import redis_client
from cachewarden.database import make_engine
from cachewarden.durability import REPLICAS, Confirmations, Durability
from cachewarden.errors import (
    BackendUnavailable,
    CachewardenError,
    ConfigError,
    DurabilityUnconfirmed,
)
from cachewarden.keys import Keyspace
from cachewarden.scripts import Registry
from cachewarden.settings import EntitySettings, Settings, load_settings
from cachewarden.tables import EntityTable, KeyNotUnique, reflect_table

T = TypeVar("T")
log = structlog.get_logger("cachewarden.context")


def _consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Context:
    """What one process needs: settings, clients, scripts, tables, and what is built on them.

    Families keep what they build per entity (a sink, a loader, script helpers) with
    `shared(kind, entity, build)`, so one process builds each once.
    """

    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        self.settings = settings
        self._owns_redis = redis is None
        self.redis = redis if redis is not None else redis_client(settings.redis)
        self.keys = Keyspace(settings.redis.prefix)
        self.lua = Registry(self.redis)
        self.consumer = _consumer_name()
        self._engine: Engine | None = None
        self._lock = threading.RLock()
        self._tables: dict[str, EntityTable] = {}
        self._shared: dict[tuple[str, str], Any] = {}
        self._confirmations: Confirmations | None = None

    @classmethod
    def build(cls, settings: Settings) -> Context:
        """A context on what `settings` names (connections are made on first use)."""
        return cls(settings)

    def entity(self, name: str) -> EntitySettings:
        """An entity's settings, or UnknownEntity naming the defined ones."""
        return self.settings.entity(name)

    @property
    def engine(self) -> Engine:
        """The database engine, created on first use."""
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = make_engine(self.settings.database)
        return self._engine

    def table(self, name: str) -> EntityTable:
        """The entity's reflected table, reflected on first use (once, under a lock)."""
        found = self._tables.get(name)
        if found is None:
            spec = self.entity(name)
            with self._lock:
                found = self._tables.get(name)
                if found is None:
                    found = reflect_table(self.engine, spec, self.settings.source)
                    self._tables[name] = found
        return found

    def columns(self, entity: str) -> frozenset[str] | None:
        """The column names of the entity's table where it is reflected already (None:
        not yet; nothing here waits for the database)."""
        table = self._tables.get(entity)
        return None if table is None else table.columns

    def key_text(self, entity: str, key: Key) -> str:
        """The validated text of `key` (a tuple for a composite key): with the entity's
        table reflected, an integer key column also refuses every spelling but the
        canonical one (tables.EntityTable)."""
        table = self._tables.get(entity)
        if table is not None:
            return table.key_text(key)
        return key_text(entity, key, len(self.entity(entity).key_columns))

    def reflect_again(self, name: str) -> EntityTable:
        """Reflect the entity's table anew (its schema changed): later users get the new
        one, and what was built on the old one (a sink, a loader) is built again."""
        spec = self.entity(name)
        with self._lock:
            found = reflect_table(self.engine, spec, self.settings.source)
            self._tables[name] = found
            for key in [k for k in self._shared if k[1] == name]:
                del self._shared[key]
        log.info("table_reflected_again", entity=name, table=spec.table)
        return found

    def reflect_all(self, strict: bool = False) -> None:
        """Reflect every entity's table now, where it costs no request; a table that
        cannot be reflected yet (database down, table missing) is reflected on first use.
        With `strict` (a Cache being built), a key column with no primary key or unique
        constraint raises KeyNotUnique (a ConfigError): no write of it could ever be
        flushed; so does a database URL whose driver is not installed
        (database.make_engine). Without it (a worker's background reflection) both are
        logged as errors, and the flush of that entity reports them."""
        try:
            self.engine  # noqa: B018 (built here: ConfigError when its driver is missing)
        except ConfigError as exc:
            if strict:
                raise
            log.error("reflect_refused", error=str(exc))
            return
        for name in self.settings.entities:
            try:
                self.table(name)
            except KeyNotUnique as exc:
                if strict:
                    raise
                log.error("reflect_refused", entity=name, error=str(exc))
            except CachewardenError as exc:
                log.warning("reflect_deferred", entity=name, error=str(exc))

    def confirm(self, spec: EntitySettings) -> None:
        """Return once this process's taken writes are kept as the entity's durability
        says (durability.py: group commit); DurabilityUnconfirmed when they are not."""
        self._confirm(self.settings.durability_of(spec))

    def replicate(self, what: str) -> None:
        """Return once `what` (a lock with its fencing token, a due time's claim, a run
        number: coordination state just written) is held by `[redis] replicas` replicas,
        whatever the write durability, so a failover cannot take it back; raise
        BackendUnavailable (the caller does not act on it, and retries) when it is not."""
        redis = self.settings.redis
        if redis.replicas <= 0:
            return
        level = Durability(REPLICAS, redis.replicas, redis.durability_timeout_ms)
        try:
            self._confirm(level)
        except DurabilityUnconfirmed as exc:
            raise BackendUnavailable(
                f"{what}: not confirmed by {level.replicas} replica(s) within "
                f"{level.timeout_ms} ms ([redis] replicas), so not acted on: a failover "
                f"could take it back ({exc.__cause__ or exc})"
            ) from exc

    def _confirm(self, durability: Durability) -> None:
        if not durability.waits:
            return
        if self._confirmations is None:
            with self._lock:
                if self._confirmations is None:
                    client = redis_client(self.settings.redis, wait_ms=durability.timeout_ms)
                    self._confirmations = Confirmations(client, self.keys.confirm_marker())
        self._confirmations.confirm(durability)

    def shared(self, kind: str, entity: str, build: Callable[[], T]) -> T:
        """The `kind` object of `entity`, built once per context by `build()`."""
        key = (kind, entity)
        found = self._shared.get(key)
        if found is None:
            with self._lock:
                found = self._shared.get(key)
                if found is None:
                    found = build()
                    self._shared[key] = found
        result: T = found
        return result

    def close(self) -> None:
        """Release connections (of a Redis client handed in, only its own connection)."""
        self.lua.close()
        if self._confirmations is not None:
            self._confirmations.close()
        self.redis.close()
        if self._owns_redis:
            self.redis.connection_pool.disconnect()
        if self._engine is not None:
            self._engine.dispose()


_current: Context | None = None
_settings: Settings | None = None


def use_settings(settings: Settings | None) -> None:
    """Build this process's context from `settings` rather than the config file (an
    application's own Celery app hands its settings to cachewarden.celery.install)."""
    global _settings
    _settings = settings


def current() -> Context:
    """This process's context, built from the config on first call (and again after fork)."""
    global _current
    if _current is None or _current.consumer != _consumer_name():
        _current = Context.build(_settings if _settings is not None else load_settings())
    return _current


def set_current(context: Context | None) -> None:
    """Install (or clear) this process's context; used after fork and by tests."""
    global _current
    _current = context
