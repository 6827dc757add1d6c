"""The asyncio read path: `get` and `get_many` over the read script, loads on threads.

The same protocol as `readpath.reader` and `readpath.misses`, with the same scripts,
keys and arguments (`ReadScripts.read_call`, `fill_call`, `give_up_call`): a hit is
one EVALSHA of read.lua on the loop; on a miss the read script's lease picks one
loader per key across processes, and in this loop one coroutine per key reads
(`flights`), the others await its value. Waiters poll the entry (not the lock) on
the sync path's `WaitPolicy`. A load runs the existing sync loader on a bounded
thread pool (one thread per connection of the engine's pool): measured against
SQLAlchemy's asyncio engine it loads about twice as fast per row and works on every
database the sync path does. Its lease is kept alive from the moment it is taken
(queued behind other loads too) by the process's lease renewer, as the sync path's.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import structlog
from redis.exceptions import RedisError

from cachewarden.aio.flights import AsyncFlights, LeaderGone, fail, follow, resolve
from cachewarden.aio.registry import AsyncRegistry
from cachewarden.codec import Key, decode_row, encode_entry
from cachewarden.context import Context
from cachewarden.errors import LoadFailed
from cachewarden.readpath.misses import ReadStats, _timeout_problem, leases_kept
from cachewarden.readpath.reader import EntityReads, ReadThrough, _RedisFailed, _unavailable
from cachewarden.readpath.singleflight import FlightTimeout, Role, WaitPolicy
from cachewarden.readpath.sqlload import Row, loader_for
from cachewarden.scripts import ScriptCall
from cachewarden.scripts.readpath import ReadScripts, Reply, filled_reply, new_token
from cachewarden.writebehind import shardcount

log = structlog.get_logger("cachewarden.readpath")
T = TypeVar("T")


class AsyncReader:
    """The read path of one `AsyncCache`: entities, this loop's flights and counters."""

    def __init__(self, context: Context, lua: AsyncRegistry, loaders: ThreadPoolExecutor) -> None:
        self.context = context
        self.lua = lua
        self.stats = ReadStats()
        self._loaders = loaders
        self._flights: AsyncFlights[str] = AsyncFlights()
        self._entities: dict[str, EntityReads] = {}
        self._random = random.Random()
        self._sync = ReadThrough(context)  # its on_redis_error = "database" loads, on a thread

    async def in_thread(self, work: Callable[[], T]) -> T:
        """`work()` on a loader thread (the loop goes on meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self._loaders, work)

    # -- get ----------------------------------------------------------------------

    async def get(self, entity: str, key: Key) -> Row | None:
        """The row of `key`: from the cache, or loaded once across all processes."""
        side = self._entities.get(entity) or await self._entity(entity)
        text = self.context.key_text(entity, key)
        try:
            return decode_row(await self._get(side, text))
        except _RedisFailed as exc:
            if side.spec.on_redis_error != "database":
                raise
            rows = await self.in_thread(partial(self._sync._from_database, side, [text], exc))
            return rows[text]

    async def _get(self, side: EntityReads, text: str) -> str:
        """The entry's value: this loop's flight of the key followed, or led."""
        spec, name = side.spec, (side.spec.name, text)
        budget = (spec.wait_timeout_ms + spec.lock_timeout_ms) / 1000 + 1
        while True:
            flight, leads = self._flights.join(name, budget)
            if leads:
                break
            self.stats.add(waits=1)
            try:
                return await follow(flight)
            except LeaderGone:
                continue  # its leader was cancelled: lead a flight of our own
            except FlightTimeout:
                raise LoadFailed(spec.name, text, _timeout_problem(spec)) from None
        try:
            value = await self._lead(side, text)
        except BaseException as exc:
            fail(flight, exc)
            raise
        finally:
            self._flights.land(name, flight)
        resolve(flight, value)
        return value

    async def _lead(self, side: EntityReads, text: str) -> str:
        """The entry's value as this flight's leader: a hit, or the miss resolved."""
        token = new_token()
        try:
            counts = side.due_counts()
            below = side.refresh_below_ms(self._draw())
            try:
                call = side.scripts.read_call(text, token, below, counts)
                raw = await self.lua.call(*call)
            except RedisError:
                side.counted(*counts)  # not passed on: keep them for the next read
                raise
            reply = Reply.parse(raw)
            if reply.value is not None:
                side.after_hit(reply, self.stats)
                side.counted(1, 0)
                return reply.value
            side.counted(0, 1)
            self.stats.add(misses=1)
            return await self._resolve(side, text, token, reply)
        except RedisError as exc:
            raise _unavailable(side.spec, text, exc) from None

    async def _resolve(self, side: EntityReads, key: str, token: str, reply: Reply) -> str:
        """Load under the lease, or wait for the value polling the entry (not the lock)."""
        spec, waiter = side.spec, None
        while True:
            if reply.value is not None:
                return reply.value
            role = Role(reply.flag)
            if role is Role.LOAD:
                return (await self._load(side.scripts, [key], token))[key]
            if role is Role.FAILED:
                raise LoadFailed(spec.name, key, reply.extra or "the last load failed")
            if waiter is None:
                waiter = WaitPolicy(spec.wait_timeout_ms).sleeps(time.monotonic())
            sleep = waiter.next_sleep(time.monotonic())
            if sleep is None:
                raise LoadFailed(spec.name, key, _timeout_problem(spec))
            await asyncio.sleep(sleep)
            poll = side.scripts.read_call(key, token, (0, 0))
            reply = Reply.parse(await self.lua.call(*poll))

    # -- loads --------------------------------------------------------------------

    async def _load(self, side: ReadScripts, keys: list[str], token: str) -> dict[str, str]:
        """Load `keys` (whose leases we hold) on a loader thread and fill them (one script
        call per key, pipelined); return each entry's value. The thread also builds the
        fills (the dirty hashes of the recorded shard count may need a read of Redis)."""
        spec, started = side.spec, time.monotonic()

        def work() -> tuple[dict[str, str], list[ScriptCall]]:
            loader = loader_for(self.context, spec.name)
            rows = {keys[0]: loader.load(keys[0])} if len(keys) == 1 else loader.load_many(keys)
            most = spec.max_value_bytes
            values = {k: encode_entry(spec.name, k, rows.get(k), most) for k in keys}
            load_ms = int((time.monotonic() - started) * 1000)
            return values, [side.fill_call(k, token, v, load_ms) for k, v in values.items()]

        with leases_kept(side, keys, token):  # from now, while it waits for a thread too
            try:
                values, fills = await self.in_thread(work)
            except LoadFailed as exc:
                await self.lua.call(*side.give_up_call(keys, token, exc.problem, "load_errors"))
                self.stats.add(load_errors=1)
                log.warning("load_failed", entity=spec.name, keys=len(keys), error=exc.problem)
                raise
            except BaseException:
                await self.lua.call(*side.give_up_call(keys, token))
                raise
        outcome = await self.lua.call_many(fills)
        self.stats.add(loads=len(keys))
        result = {}
        for (key, value), raw in zip(values.items(), outcome, strict=True):
            filled, current = filled_reply(raw)
            # Refused: a write or delete came after the load began; its value wins.
            result[key] = value if filled or current is None else current
        return result

    # -- get_many -----------------------------------------------------------------

    async def get_many(self, entity: str, keys: Sequence[Key]) -> list[Row | None]:
        """The rows of `keys`, in order (None where absent): hits in one round trip,
        misses loaded with one batched SELECT where this loop leads them."""
        side = self._entities.get(entity) or await self._entity(entity)
        texts = [self.context.key_text(entity, k) for k in keys]
        unique = list(dict.fromkeys(texts))
        if not unique:
            return []
        try:
            values = await self._get_many(side, unique)
        except _RedisFailed as exc:
            if side.spec.on_redis_error != "database":
                raise
            rows = await self.in_thread(partial(self._sync._from_database, side, unique, exc))
            return [rows[t] for t in texts]
        return [decode_row(values[t]) for t in texts]

    async def _get_many(self, side: EntityReads, unique: list[str]) -> dict[str, str]:
        token, values = new_token(), {}
        try:
            counts = side.due_counts()
            below = side.refresh_below_ms(self._draw())
            calls = [
                side.scripts.read_call(t, token, below, counts if n == 0 else (0, 0))
                for n, t in enumerate(unique)
            ]
            try:
                raws = await self.lua.call_many(calls)
            except RedisError:
                side.counted(*counts)
                raise
            missed = []
            for text, raw in zip(unique, raws, strict=True):
                reply = Reply.parse(raw)
                if reply.value is None:
                    missed.append((text, reply))
                else:
                    values[text] = reply.value
                    side.after_hit(reply, self.stats)
            side.counted(len(unique) - len(missed), len(missed))
            if missed:
                self.stats.add(misses=len(missed))
                values.update(await self._miss_many(side, token, missed))
        except RedisError as exc:
            raise _unavailable(side.spec, unique[0], exc) from None
        return values

    async def _miss_many(
        self, side: EntityReads, token: str, missed: list[tuple[str, Reply]]
    ) -> dict[str, str]:
        """Misses of `get_many`: one batched load of the keys this loop leads and whose
        leases we took; the others resolved one by one, or followed."""
        scripts, name = side.scripts, side.spec.name
        led: list[tuple[str, Reply, asyncio.Future[str]]] = []
        following: list[str] = []
        spec = side.spec
        budget = (spec.wait_timeout_ms + spec.lock_timeout_ms) / 1000 + 1
        for key, reply in missed:
            flight, leads = self._flights.join((name, key), budget)
            if leads:
                led.append((key, reply, flight))
                continue
            if reply.flag == Role.LOAD.value:  # another coroutine of ours reads it
                await self.lua.call(*scripts.give_up_call([key], token))
            following.append(key)
        try:
            values, errors = await self._lead_many(side, token, led)
        finally:
            for key, _, flight in led:
                self._flights.land((name, key), flight)
        for key in following:
            values[key] = await self._get(side, key)
        if errors:
            raise errors[0]
        return values

    async def _lead_many(
        self, side: EntityReads, token: str, led: list[tuple[str, Reply, asyncio.Future[str]]]
    ) -> tuple[dict[str, str], list[Exception]]:
        """Resolve the flights this call leads: batch-load those whose lease we took."""
        values: dict[str, str] = {}
        errors: list[Exception] = []
        try:
            batch = [k for k, r, _ in led if r.flag == Role.LOAD.value]
            if batch:
                values.update(await self._load(side.scripts, batch, token))
            for key, reply, flight in led:
                try:
                    if key not in values:
                        values[key] = await self._resolve(side, key, token, reply)
                    resolve(flight, values[key])
                except Exception as exc:
                    fail(flight, exc)
                    errors.append(exc)
        except BaseException as exc:
            for _, _, flight in led:
                fail(flight, exc)
            raise
        return values, errors

    # -- plumbing -----------------------------------------------------------------

    def _draw(self) -> float:
        return 1.0 - self._random.random()  # in (0, 1]

    async def _entity(self, name: str) -> EntityReads:
        """The entity's read state, built on a loader thread the first time: the shard
        count Redis records is read there once (a read never waits on it again)."""
        spec = self.context.entity(name)  # UnknownEntity, before any I/O

        def build() -> EntityReads:
            shardcount.known(self.context, spec.name)
            return EntityReads(self.context, spec)

        try:
            found = await self.in_thread(build)
        except RedisError as exc:
            raise _unavailable(spec, "*", exc) from None
        return self._entities.setdefault(name, found)

    async def publish(self) -> None:
        """Add the hits and misses counted so far to Redis (at close)."""
        for side in list(self._entities.values()):
            await self.in_thread(side.publish)
