"""`AsyncCache`: the application API of `Cache`, awaited, on redis.asyncio.

Same methods, same errors, same scripts, keys and arguments as `Cache`, so sync and
asyncio processes share one cache and one write buffer. What it shares with the sync
path: the settings and `Context` (tables, engine, shard counts), the typed script
classes that build every KEYS and ARGV (`WriteScripts.enqueue_call`,
`ReadScripts.read_call` ...), the write path's validation and reply handling
(`writebehind.enqueue`), the lease renewer and the loaders. What differs: the send
(`AsyncRegistry`), this loop's flights, and loads on a bounded thread pool.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachewarden.aio.confirm import AsyncConfirmations
from cachewarden.aio.connections import async_redis_client
from cachewarden.aio.reader import AsyncReader
from cachewarden.aio.registry import AsyncRegistry
from cachewarden.cache import Row, _one
from cachewarden.codec import Key
from cachewarden.connections import check_durability
from cachewarden.context import Context
from cachewarden.errors import (
    BackendUnavailable,
    ConfigError,
    DurabilityUnconfirmed,
    InvalidKey,
    InvalidValue,
)
from cachewarden.keys import Keyspace
from cachewarden.scripts.writebehind import Pending, WriteScripts
from cachewarden.settings import EntitySettings, Settings, load_settings
from cachewarden.writebehind.enqueue import (
    BatchResult,
    Outcome,
    delete_op,
    follow_shards,
    outcomes,
    record,
    refusal,
    send_failed,
    sendable,
    write_op,
    write_scripts,
)
from cachewarden.writebehind.shardcount import check_shards

# Script calls in flight at once, each on a connection of its own: past this many they
# queue. An event loop gains nothing from more (one thread packs and parses them all),
# and opening a connection costs the loop about 0.6 ms: a stampede of 100 leaders
# opening 100 connections at once would stall it for 60 ms.
LOOP_CONNECTIONS = 16

# Loads run on this many threads: the engine's pool holds 2 + 2 overflow connections
# (database.make_engine), so more threads would only queue on it.
LOADER_THREADS = 4


class AsyncCache:
    """A handle on the cache for asyncio code: `Cache`'s methods, awaited.

    Build one per event loop. `AsyncCache(settings)` does no I/O; `async with` (or
    `await cache.start()`, or the first call) reflects the entities' tables, checks the
    shard counts and loads the read scripts, on a thread. `close()` releases what it
    built. Misses load on `loader_threads` threads, never on the loop.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        redis: Redis | None = None,
        *,
        context: Context | None = None,
        reflect: bool = True,
        loader_threads: int = LOADER_THREADS,
    ) -> None:
        if context is None:
            if settings is None:
                raise TypeError("AsyncCache needs settings (or a context)")
            context = Context(settings)
            self._owns_context = True
        else:
            self._owns_context = False
        self.context = context
        self.settings = context.settings
        self._owns_redis = redis is None
        self.redis = redis if redis is not None else async_redis_client(self.settings.redis)
        self.lua = AsyncRegistry(self.redis, LOOP_CONNECTIONS)
        self._loaders = ThreadPoolExecutor(loader_threads, thread_name_prefix="cachewarden-load")
        self._reader = AsyncReader(context, self.lua, self._loaders)
        self._reflect = reflect and self._owns_context
        self._started: asyncio.Future[None] | None = None
        self._writers: set[str] = set()  # entities whose shard count this cache has read
        self._confirmations: AsyncConfirmations | None = None

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> AsyncCache:
        """An AsyncCache from a config file (default: $CACHEWARDEN_CONFIG or config/)."""
        return cls(load_settings(path))

    @property
    def keys(self) -> Keyspace:
        """The key names under this cache's prefix."""
        return self.context.keys

    @property
    def reader(self) -> AsyncReader:
        """The read path: its `stats` count this cache's reads."""
        return self._reader

    def entity(self, name: str) -> EntitySettings:
        """The settings of entity `name`, or UnknownEntity naming the defined ones."""
        return self.settings.entity(name)

    # -- life -----------------------------------------------------------------------

    async def start(self) -> None:
        """Reflect the tables, record or check the shard counts and load the read scripts
        (once; the first call of any method does it). Raises ConfigError as `Cache()`
        does; with Redis or the database down, what needs them waits for first use."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            try:
                await self._reader.in_thread(self._prepare)
                try:
                    await self.lua.preload(("read", "fill"))
                except RedisError:
                    pass  # the first read loads them
            except BaseException as exc:
                self._started.set_exception(exc)
                self._started.exception()
                self._started = None
                raise
            self._started.set_result(None)
        await asyncio.shield(self._started)

    def _prepare(self) -> None:
        if self._reflect:
            self.context.reflect_all(strict=True)
        try:
            check_shards(self.context)
            check_durability(self.context.redis, self.settings)
        except (RedisError, BackendUnavailable):
            pass  # Redis down: the first read or write reads the record

    async def close(self) -> None:
        """Release the Redis connections, the loader threads and (of a context it built)
        the database engine."""
        try:
            await self._reader.publish()
        finally:
            await self.lua.close()
            if self._confirmations is not None:
                await self._confirmations.close()
            if self._owns_redis:
                await self.redis.aclose()
            self._loaders.shutdown(wait=False)
            if self._owns_context:
                self.context.close()

    async def __aenter__(self) -> AsyncCache:
        try:
            await self.start()
        except ConfigError:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- reads ----------------------------------------------------------------------

    async def get(self, entity: str, key: Key) -> dict[str, Any] | None:
        """The row of `key` as a dict, or None where the database has no such row (see
        `Cache.get`): a hit is one round trip; a miss loads once across all processes
        and coroutines, on a loader thread."""
        if self._started is None or not self._started.done():
            await self.start()
        return await self._reader.get(entity, key)

    async def get_many(self, entity: str, keys: Sequence[Key]) -> list[dict[str, Any] | None]:
        """The rows of `keys` in order (None where absent); misses load in one batch."""
        if self._started is None or not self._started.done():
            await self.start()
        return await self._reader.get_many(entity, keys)

    # -- writes ---------------------------------------------------------------------

    async def write(self, entity: str, key: Key, row: Row) -> str:
        """Cache `row` under `key` and buffer its upsert; return the stream id (see
        `Cache.write`: the same errors, before anything is sent where it says so)."""
        scripts = await self._scripts(entity)
        op = write_op(
            scripts.spec, key, row, self.context.key_text(entity, key), self.context.columns(entity)
        )
        problem = refusal(scripts, op)
        if problem is not None:
            raise problem
        taken = _one(await self._send(scripts, [op]))
        await self._confirm(scripts.spec)
        return taken

    async def delete(self, entity: str, key: Key, version: int | None = None) -> str:
        """Mark `key` absent in the cache and buffer its delete (see `Cache.delete`)."""
        scripts = await self._scripts(entity)
        text = self.context.key_text(entity, key)
        taken = _one(await self._send(scripts, [delete_op(scripts.spec, key, version, text)]))
        await self._confirm(scripts.spec)
        return taken

    async def write_many(
        self, entity: str, rows: Mapping[Key, Row] | Iterable[tuple[Key, Row]]
    ) -> BatchResult:
        """Cache and buffer many rows in one round trip; report each key's outcome."""
        scripts = await self._scripts(entity)
        pairs = rows.items() if isinstance(rows, Mapping) else rows
        result = BatchResult()
        ops: list[Pending] = []
        for key, row in pairs:
            try:
                text = self.context.key_text(entity, key)
                ops.append(write_op(scripts.spec, key, row, text, self.context.columns(entity)))
            except (InvalidKey, InvalidValue) as exc:
                result.refused[str(key)] = exc
        return await self._send_many(scripts, ops, result)

    async def delete_many(
        self,
        entity: str,
        keys: Iterable[Key],
        versions: Mapping[Key, int] | None = None,
    ) -> BatchResult:
        """Mark many keys absent and buffer their deletes in one round trip."""
        scripts = await self._scripts(entity)
        result = BatchResult()
        ops: list[Pending] = []
        for key in keys:
            try:
                text = self.context.key_text(entity, key)
                ops.append(delete_op(scripts.spec, key, (versions or {}).get(key), text))
            except (InvalidKey, InvalidValue) as exc:
                result.refused[str(key)] = exc
        return await self._send_many(scripts, ops, result)

    async def _send_many(
        self, scripts: WriteScripts, ops: Sequence[Pending], result: BatchResult
    ) -> BatchResult:
        ops = sendable(scripts, ops, result)
        if ops:
            record(result, ops, await self._send(scripts, ops))
        if result.taken:
            try:
                await self._confirm(scripts.spec)
            except DurabilityUnconfirmed as exc:
                raise DurabilityUnconfirmed(str(exc), result) from exc
        return result

    async def _confirm(self, spec: EntitySettings) -> None:
        """Return once this loop's taken writes are kept as the entity's durability says
        (cachewarden.durability); DurabilityUnconfirmed when they are not."""
        durability = self.settings.durability_of(spec)
        if not durability.waits:
            return
        if self._confirmations is None:
            client = async_redis_client(self.settings.redis, wait_ms=durability.timeout_ms)
            self._confirmations = AsyncConfirmations(client, self.keys.confirm_marker())
        await self._confirmations.confirm(durability)

    async def _send(
        self, scripts: WriteScripts, ops: Sequence[Pending], follow: bool = True
    ) -> list[Outcome]:
        """enqueue.lua, once: never sent again after it went out (ReplyLost ->
        BackendUnavailable saying the write may be buffered); a call refused whole for
        the shard count is sent once more on the count Redis records."""
        try:
            replies = await self.lua.call(*scripts.enqueue_call(ops), resend=False)
        except RedisError as exc:
            raise send_failed(scripts, exc) from None
        again = follow_shards(scripts, replies, follow)
        if again is not None:
            return await self._send(again, ops, follow=False)
        return outcomes(scripts, ops, replies)

    async def _scripts(self, entity: str) -> WriteScripts:
        """The entity's write scripts; the first time, built on a thread (the shard count
        Redis records is read there: later calls know it without a read)."""
        if self._started is None or not self._started.done():
            await self.start()
        if entity in self._writers:
            return write_scripts(self.context, entity)
        spec = self.context.entity(entity)  # UnknownEntity, before any I/O
        try:
            scripts = await self._reader.in_thread(lambda: write_scripts(self.context, entity))
        except RedisError as exc:
            raise BackendUnavailable(
                f"{spec.name}: Redis is unreachable ({exc}); the write was not taken"
            ) from None
        self._writers.add(entity)
        return scripts
