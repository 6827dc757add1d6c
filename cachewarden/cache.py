"""The application-side API: `Cache.write`, `Cache.delete` (and the read path).

A write sets the cache entry and appends the operation to its shard's write
stream in one Lua script: one round trip, atomic, and done when it returns.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from redis import Redis
from redis.exceptions import RedisError, ResponseError

from cachewarden.codec import ABSENT, encode_row, key_text
from cachewarden.connections import REDIS_DOWN, redis_client
from cachewarden.errors import BackendUnavailable, Backpressure, InvalidValue
from cachewarden.keys import Keyspace, due_member, shard_of
from cachewarden.readthrough import ReadThrough
from cachewarden.scripts import Scripts
from cachewarden.settings import EntitySettings, Settings, load_settings


class Cache:
    """A handle on the cache: one Redis pool and the registered scripts."""

    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        self.settings = settings
        self.keys = Keyspace(settings.redis.prefix)
        self.redis = redis if redis is not None else redis_client(settings.redis)
        self._scripts = Scripts.register(self.redis)
        self._reader: ReadThrough | None = None

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> Cache:
        """Build a Cache from a config file (default: $CACHEWARDEN_CONFIG or config/)."""
        return cls(load_settings(path))

    def close(self) -> None:
        """Release the Redis connections (and the read path's database engine)."""
        if self._reader is not None:
            self._reader.close()
        self.redis.close()

    @property
    def reader(self) -> ReadThrough:
        """The read path (built on first use): its `stats` count this process's reads."""
        if self._reader is None:
            self._reader = ReadThrough(self.settings, self.redis, self.keys, self._scripts)
        return self._reader

    def get(self, entity: str, key: str | int) -> dict[str, Any] | None:
        """The row of `key` as a dict, or None where the database has no such row.

        A hit is one Redis round trip. A miss loads the row once across all
        processes (the others wait for it, up to `wait_timeout`) and caches it;
        an absent row is cached as known-absent for `negative_ttl`. Raises
        LoadFailed naming the entity, key and database error when the load fails.
        """
        return self.reader.get(entity, key)

    def get_many(self, entity: str, keys: Sequence[str | int]) -> list[dict[str, Any] | None]:
        """The rows of `keys` in order (None where absent); misses load in one batch."""
        return self.reader.get_many(entity, keys)

    def entity(self, name: str) -> EntitySettings:
        """The settings of entity `name`, or UnknownEntity naming the defined ones."""
        return self.settings.entity(name)

    def write(self, entity: str, key: str | int, row: Mapping[str, Any]) -> str:
        """Cache `row` under `key` and buffer its upsert; return the stream id.

        Returns once both are in Redis. Raises UnknownEntity, InvalidKey or
        InvalidValue before anything is sent, Backpressure when the shard is full.
        """
        spec = self.entity(entity)
        text = key_text(entity, key)
        row = _with_key(spec, text, key, row)
        version = _version_of(spec, text, row)
        value = encode_row(entity, text, row, spec.max_value_bytes)
        return self._enqueue(spec, "w", text, value, version)

    def delete(self, entity: str, key: str | int, version: int | None = None) -> str:
        """Mark `key` absent in the cache and buffer its delete; return the stream id."""
        spec = self.entity(entity)
        text = key_text(entity, key)
        if version is not None and spec.version_column is None:
            raise InvalidValue(f"{entity}:{text}: a version was given but no version_column is set")
        return self._enqueue(spec, "d", text, ABSENT, "" if version is None else str(version))

    def _enqueue(self, spec: EntitySettings, op: str, key: str, value: str, version: str) -> str:
        wb = spec.write_behind
        shard = shard_of(key, wb.shards)
        keys = self.keys
        try:
            stream_id: str = self._scripts.enqueue(
                keys=[
                    keys.entry(spec.name, key),
                    keys.stream(spec.name, shard),
                    keys.dirty(spec.name, shard),
                    keys.due(),
                    keys.dead_keys(spec.name),
                    keys.lease(spec.name, key),
                ],
                args=[
                    op,
                    key,
                    value,
                    wb.max_pending,
                    wb.batch_size,
                    wb.max_delay_ms,
                    due_member(spec.name, shard),
                    spec.version_column or "",
                    version,
                ],
            )
        except ResponseError as exc:
            if str(exc).startswith("BACKPRESSURE"):
                raise Backpressure(
                    f"{spec.name}: shard {shard} holds {wb.max_pending} unflushed writes "
                    f"(write_behind.max_pending); the write of {key!r} was not taken. "
                    "Retry later; if this persists, check the flushers and the database."
                ) from None
            raise BackendUnavailable(f"{spec.name}:{key}: Redis refused the write: {exc}") from None
        except REDIS_DOWN as exc:
            raise BackendUnavailable(
                f"{spec.name}:{key}: Redis at {self.settings.redis.url} is unreachable ({exc}); "
                "the write was not taken"
            ) from None
        except RedisError as exc:
            raise BackendUnavailable(f"{spec.name}:{key}: Redis error: {exc}") from None
        return stream_id


def _with_key(
    spec: EntitySettings, text: str, key: str | int, row: Mapping[str, Any]
) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise InvalidValue(
            f"{spec.name}:{text}: the row is a {type(row).__name__}; pass a dict of column values"
        )
    if spec.key not in row:
        return {**row, spec.key: key}
    if str(row[spec.key]) != text:
        raise InvalidValue(
            f"{spec.name}:{text}: row[{spec.key!r}] is {row[spec.key]!r}, not the key {text!r}"
        )
    return row


def _version_of(spec: EntitySettings, text: str, row: Mapping[str, Any]) -> str:
    if spec.version_column is None:
        return ""
    version = row.get(spec.version_column)
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidValue(
            f"{spec.name}:{text}: row[{spec.version_column!r}] must be an int version "
            f"(entities.{spec.name}.version_column), got {version!r}"
        )
    return str(version)
