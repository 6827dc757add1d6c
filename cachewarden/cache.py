"""The application-side API: write, delete, get and their batch forms.

A write sets the cache entry and appends the operation to its shard's write
stream in one Lua script: one round trip, atomic, and done when it returns.
`write_many` and `delete_many` do the same for a whole batch in one round trip.
Nothing here needs Celery: reads record refresh requests in Redis, and the
workers turn them into tasks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from cachewarden.codec import Key
from cachewarden.connections import check_durability
from cachewarden.context import Context
from cachewarden.errors import (
    BackendUnavailable,
    Backpressure,
    ConfigError,
    DurabilityUnconfirmed,
    InvalidKey,
    InvalidValue,
    Outranked,
)
from cachewarden.keys import Keyspace
from cachewarden.readpath.reader import ReadThrough
from cachewarden.scripts.writebehind import Pending
from cachewarden.settings import EntitySettings, Settings, load_settings
from cachewarden.writebehind.enqueue import (
    BatchResult,
    Outcome,
    delete_op,
    enqueue,
    enqueue_many,
    write_op,
    write_scripts,
)
from cachewarden.writebehind.shardcount import check_shards

Row = Mapping[str, Any]


class Cache:
    """A handle on the cache: this process's context (Redis pool, scripts, tables).

    Build one per process and share it between threads. `Cache(settings)` builds
    its own context, reflects the entities' tables and opens its Redis connection
    with the read scripts loaded at once (where that costs no request;
    `reflect=False` defers both to the first read); `Cache(context=...)`
    shares one, as the worker does. Use it as a context manager, or `close()` it.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        redis: Redis | None = None,
        *,
        context: Context | None = None,
        reflect: bool = True,
    ) -> None:
        if context is None:
            if settings is None:
                raise TypeError("Cache needs settings (or a context)")
            context = Context(settings, redis)
            self._owns_context = True
        else:
            self._owns_context = False
        self.context = context
        self.settings = context.settings
        self._reader = ReadThrough(context)
        if self._owns_context and reflect:
            try:
                context.reflect_all(strict=True)
            except ConfigError:
                context.close()
                raise
            self._reader.warm()
            self._check_shards()
            self._check_durability()

    def _check_shards(self) -> None:
        """Record each entity's configured shard count where Redis records none, and log a
        warning (starting all the same) where the record differs or a reshard drains: this
        Cache follows the count Redis records, not its config's (see shardcount.py). With
        Redis down nothing is checked here: the first write reads the record."""
        try:
            check_shards(self.context)
        except RedisError:
            pass
        except ConfigError:
            self.close()
            raise

    def _check_durability(self) -> None:
        """Refuse (ConfigError naming the fix) a durability this Redis cannot give; with
        Redis down nothing is checked here (the first write raises)."""
        try:
            check_durability(self.redis, self.settings)
        except BackendUnavailable:
            pass
        except ConfigError:
            self.close()
            raise

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> Cache:
        """Build a Cache from a config file (default: $CACHEWARDEN_CONFIG or config/)."""
        return cls(load_settings(path))

    @property
    def redis(self) -> Redis:
        """The Redis client of this cache's context."""
        return self.context.redis

    @property
    def keys(self) -> Keyspace:
        """The key names under this cache's prefix."""
        return self.context.keys

    @property
    def reader(self) -> ReadThrough:
        """The read path: its `stats` count this process's reads."""
        return self._reader

    def close(self) -> None:
        """Release the Redis connections and the database engine (of a context it built)."""
        self._reader.publish()
        if self._owns_context:
            self.context.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def entity(self, name: str) -> EntitySettings:
        """The settings of entity `name`, or UnknownEntity naming the defined ones."""
        return self.settings.entity(name)

    # -- reads ------------------------------------------------------------------

    def get(self, entity: str, key: Key) -> dict[str, Any] | None:
        """The row of `key` as a dict, or None where the database has no such row.

        A hit is one Redis round trip. A miss loads the row once across all
        processes (the others wait for it, up to `wait_timeout`) and caches it;
        an absent row is cached as known-absent for `negative_ttl`. Raises
        LoadFailed naming the entity, key and database error when the load fails.
        """
        return self._reader.get(entity, key)

    def get_many(self, entity: str, keys: Sequence[Key]) -> list[dict[str, Any] | None]:
        """The rows of `keys` in order (None where absent); misses load in one batch."""
        return self._reader.get_many(entity, keys)

    # -- writes -----------------------------------------------------------------

    def write(self, entity: str, key: Key, row: Row) -> str:
        """Cache `row` under `key` and buffer its upsert; return the stream id.

        Returns once both are in Redis, and kept as the entity's `durability` says
        (durability.py). Raises UnknownEntity, InvalidKey or InvalidValue before
        anything is sent, Backpressure when the shard is full, Outranked (nothing
        taken) when the row's version is no higher than a delete of the key within
        `tombstone_ttl`, and DurabilityUnconfirmed when the write was taken but its
        durability not confirmed in time (a retry is safe).
        """
        scripts = write_scripts(self.context, entity)
        text = self.context.key_text(entity, key)
        columns = self.context.columns(entity)
        taken = _one(enqueue(scripts, [write_op(scripts.spec, key, row, text, columns)]))
        self.context.confirm(scripts.spec)
        return taken

    def delete(self, entity: str, key: Key, version: int | None = None) -> str:
        """Mark `key` absent in the cache and buffer its delete; return the stream id.

        A versioned delete leaves a tombstone: for `tombstone_ttl`, writes and deletes
        of the key at that version or lower are not taken (this raises Outranked for one,
        as `write` does)."""
        scripts = write_scripts(self.context, entity)
        text = self.context.key_text(entity, key)
        taken = _one(enqueue(scripts, [delete_op(scripts.spec, key, version, text)]))
        self.context.confirm(scripts.spec)
        return taken

    def write_many(
        self, entity: str, rows: Mapping[Key, Row] | Iterable[tuple[Key, Row]]
    ) -> BatchResult:
        """Cache and buffer many rows in one round trip; report each key's outcome.

        `rows` maps keys to rows (or is a sequence of (key, row) pairs, applied in
        order). A row that is invalid, or whose shard is full, is refused with its
        error in `.refused`; a row a newer delete outranks (where `write` raises
        Outranked) is listed in `.outranked`; every other row is taken (`.taken`:
        key -> stream id). Raises UnknownEntity before anything is sent.
        """
        scripts = write_scripts(self.context, entity)
        pairs = rows.items() if isinstance(rows, Mapping) else rows
        result = BatchResult()
        ops: list[Pending] = []
        columns = self.context.columns(entity)
        for key, row in pairs:
            try:
                text = self.context.key_text(entity, key)
                ops.append(write_op(scripts.spec, key, row, text, columns))
            except (InvalidKey, InvalidValue) as exc:
                result.refused[str(key)] = exc
        enqueue_many(scripts, ops, result)
        return self._confirmed(scripts.spec, result)

    def delete_many(
        self,
        entity: str,
        keys: Iterable[Key],
        versions: Mapping[Key, int] | None = None,
    ) -> BatchResult:
        """Mark many keys absent and buffer their deletes in one round trip (per-key report).

        `versions` gives the version of each delete where the entity has a version column;
        a delete a newer one outranks is listed in `.outranked`.
        """
        scripts = write_scripts(self.context, entity)
        result = BatchResult()
        ops: list[Pending] = []
        for key in keys:
            try:
                text = self.context.key_text(entity, key)
                ops.append(delete_op(scripts.spec, key, (versions or {}).get(key), text))
            except (InvalidKey, InvalidValue) as exc:
                result.refused[str(key)] = exc
        enqueue_many(scripts, ops, result)
        return self._confirmed(scripts.spec, result)

    def _confirmed(self, spec: EntitySettings, result: BatchResult) -> BatchResult:
        """`result`, once the durability of its taken writes is confirmed (one
        confirmation per batch); DurabilityUnconfirmed carries it otherwise."""
        if result.taken:
            try:
                self.context.confirm(spec)
            except DurabilityUnconfirmed as exc:
                raise DurabilityUnconfirmed(str(exc), result) from exc
        return result


def _one(outcomes: list[Outcome]) -> str:
    outcome = outcomes[0]
    if isinstance(outcome, Backpressure | Outranked):
        raise outcome
    return outcome
