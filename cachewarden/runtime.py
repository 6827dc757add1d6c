"""Per-process resources: the Redis client, the engine and the table sinks.

Built lazily on first use after fork (a prefork Celery child builds its own),
never at import. This module is the only one that keeps them in global state.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from redis import Redis
from sqlalchemy import Engine

from cachewarden.connections import redis_client
from cachewarden.database import make_engine
from cachewarden.keys import Keyspace
from cachewarden.loader import Loader
from cachewarden.scripts import Scripts
from cachewarden.settings import EntitySettings, Settings, load_settings
from cachewarden.sqlsink import SqlSink


@dataclass
class Runtime:
    """What a worker process needs to flush: settings, clients, scripts, sinks."""

    settings: Settings
    redis: Redis
    keys: Keyspace
    scripts: Scripts
    consumer: str
    _engine: Engine | None = None
    _sinks: dict[str, SqlSink] = field(default_factory=dict)
    _loaders: dict[str, Loader] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Connect (lazily) to what `settings` names."""
        client = redis_client(settings.redis)
        return cls(
            settings=settings,
            redis=client,
            keys=Keyspace(settings.redis.prefix),
            scripts=Scripts.register(client),
            consumer=f"{socket.gethostname()}-{os.getpid()}",
        )

    @property
    def engine(self) -> Engine:
        """The database engine, created on first use."""
        if self._engine is None:
            self._engine = make_engine(self.settings.database)
        return self._engine

    def entity(self, name: str) -> EntitySettings:
        """An entity's settings, or UnknownEntity naming the defined ones."""
        return self.settings.entity(name)

    def sink(self, name: str) -> SqlSink:
        """The reflected table sink of an entity, built on first use."""
        sink = self._sinks.get(name)
        if sink is None:
            sink = SqlSink(self.engine, self.entity(name), self.settings.source)
            self._sinks[name] = sink
        return sink

    def loader(self, name: str) -> Loader:
        """The reflected-table loader of an entity (the read path), built on first use."""
        loader = self._loaders.get(name)
        if loader is None:
            loader = Loader(self.engine, self.entity(name), self.settings.source)
            self._loaders[name] = loader
        return loader

    def close(self) -> None:
        """Release connections."""
        self.redis.close()
        if self._engine is not None:
            self._engine.dispose()


_current: Runtime | None = None


def get_runtime() -> Runtime:
    """This process's runtime, built from the config on first call."""
    global _current
    if _current is None or _current.consumer != f"{socket.gethostname()}-{os.getpid()}":
        _current = Runtime.build(load_settings())
    return _current


def set_runtime(runtime: Runtime | None) -> None:
    """Install (or clear) this process's runtime; used after fork and by tests."""
    global _current
    _current = runtime
