"""Read-through: `get` and `get_many` over Redis, the lease protocol and the loader.

A hit is one round trip (one EVALSHA of read.lua: the value, its TTL, the
hot-key touch and, when the entry is due for an early refresh, the refresh
request). A miss runs one loader per key across every process and host
(`readpath.singleflight`, `scripts.readpath`); the others wait for the value.
How little time may be left before a read asks for a refresh is decided here,
before the round trip (`readpath.xfetch`); the read script compares and records
the request, and the workers send it as a batched refresh task
(`readpath.refresh`). No broker is involved on this side. Inside the stale
grace (`stale_ttl`) the old value is served while that refresh runs or fails.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence

import structlog
from redis.exceptions import RedisError

from cachewarden.codec import Key, decode_row, encode_entry
from cachewarden.context import Context
from cachewarden.errors import BackendUnavailable
from cachewarden.metrics import emit
from cachewarden.readpath.misses import MissLoader, ReadStats
from cachewarden.readpath.refresh import read_scripts
from cachewarden.readpath.sqlload import Row, SqlLoader, loader_for
from cachewarden.readpath.xfetch import EarlyRefresh
from cachewarden.scripts.readpath import Reply, new_token, preload
from cachewarden.settings import EntitySettings

log = structlog.get_logger("cachewarden.readpath")


# Hits and misses are counted here and passed on to Redis's read counters (`status`, the
# metrics) with the read that comes after so many reads or seconds: the read script adds
# them, so a hit stays one round trip.
PUBLISH_EVERY_READS = 1000
PUBLISH_EVERY_S = 1.0


class EntityReads:
    """What reads of one entity reuse: its scripts, early-refresh rule, last delay, and
    the hits and misses not yet added to Redis's counters."""

    def __init__(self, context: Context, spec: EntitySettings) -> None:
        self.spec = spec
        self.context = context
        self.scripts = read_scripts(context, spec.name)
        self.hits = self.misses = 0
        self._published_at = time.monotonic()
        self.rule = EarlyRefresh(spec.early_refresh, spec.refresh_ahead, spec.xfetch_beta)
        self.fixed = spec.early_refresh != "xfetch" or spec.refresh_ahead <= 0
        self.delay_ms: float | None = None  # the refresh delay the last hit reported
        # on_redis_error = "database": the turns of this process's loads while Redis fails.
        self.gate = threading.BoundedSemaphore(spec.redis_error_reads)
        self._factor = (
            self.rule.refresh_below_ms(spec.ttl_ms, None, 1.0),
            self.rule.refresh_below_ms(spec.negative_ttl_ms, None, 1.0),
        )

    def after_hit(self, reply: Reply, stats: ReadStats) -> None:
        """Count a hit (or stale hit) and the refresh it asked for in `stats`; note the
        entity's refresh delay the script returned."""
        # A pending write's entry has no TTL (pttl -1): a plain hit.
        stale = 0 <= reply.pttl_ms <= self.spec.stale_ttl_ms
        stats.hit(stale, reply.flag)
        if reply.extra:
            self.delay_ms = float(reply.extra)

    def counted(self, hits: int, misses: int) -> None:
        """Count reads (passed on to Redis with a later read, see `due_counts`)."""
        self.hits += hits
        self.misses += misses

    def due_counts(self) -> tuple[int, int]:
        """The counts to pass on with this read, when enough reads or time have gone by
        (the read script adds them: counting costs no round trip); else (0, 0)."""
        if (
            self.hits + self.misses < PUBLISH_EVERY_READS
            and time.monotonic() - self._published_at < PUBLISH_EVERY_S
        ):
            return 0, 0
        counts, self.hits, self.misses = (self.hits, self.misses), 0, 0
        self._published_at = time.monotonic()
        return counts

    def publish(self) -> None:
        """Add the counts not yet passed on to Redis (at close; best effort)."""
        hits, misses, self.hits, self.misses = self.hits, self.misses, 0, 0
        if not hits and not misses:
            return
        stats = self.context.keys.read_stats(self.spec.name)
        try:
            with self.context.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(stats, "hits", hits)
                pipe.hincrby(stats, "misses", misses)
                pipe.execute()
        except RedisError as exc:
            log.warning("read_counters_unpublished", entity=self.spec.name, error=str(exc))

    def refresh_below_ms(self, rand: float) -> tuple[float, float]:
        """(row, known-absent): ask for a refresh when at most this many ms are left."""
        if self.fixed or self.delay_ms is None:
            return self._factor
        below = self.rule.refresh_below_ms(self.spec.ttl_ms, self.delay_ms, rand)
        return below, below


class ReadThrough:
    """The read path of one `Cache`: entities, in-process flights and counters."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.settings = context.settings
        self.stats = ReadStats()
        self._misses = MissLoader(self.stats, self._loader)
        self._entities: dict[str, EntityReads] = {}
        self._random = random.Random()
        self._texts = context.key_text

    # -- public ---------------------------------------------------------------

    def warm(self) -> None:
        """Open the hit path's Redis connection and load its scripts now, so that the
        first read pays neither; if Redis is down, the first read does it instead."""
        try:
            preload(self.context.lua)
        except RedisError as exc:
            log.warning("redis_warm_deferred", error=str(exc))

    def get(self, entity: str, key: Key) -> Row | None:
        """The row of `key`: from the cache, or loaded once across all processes.

        One thread per process and key reads at a time: the others follow its
        flight, so a stampede of threads costs one round trip per process. Where
        Redis fails and the entity says on_redis_error = "database", the row is
        loaded from the database instead (`_from_database`).
        """
        side = self._entity(entity)
        text = self._texts(entity, key)
        try:
            return self._get(side, entity, text)
        except _RedisFailed as exc:
            if side.spec.on_redis_error != "database":
                raise
            return self._from_database(side, [text], exc)[text]

    def _get(self, side: EntityReads, entity: str, text: str) -> Row | None:
        flights = self._misses.flights
        flight, leads = flights.join((entity, text))
        if not leads:
            return decode_row(self._misses.follow(side.spec, text, flight))
        try:
            value = self._lead(side, text)
        except BaseException as exc:
            flight.fail(exc)
            raise
        finally:
            flights.land((entity, text), flight)
        flight.resolve(value)
        return decode_row(value)

    def _lead(self, side: EntityReads, text: str) -> str:
        """The entry's value as this flight's leader: a hit, or the miss resolved."""
        token = new_token()
        try:
            counts = side.due_counts()
            try:
                reply = side.scripts.read(text, token, side.refresh_below_ms(self._draw()), counts)
            except RedisError:
                side.counted(*counts)  # not passed on: keep them for the next read
                raise
            if reply.value is not None:
                side.after_hit(reply, self.stats)
                side.counted(1, 0)
                return reply.value
            side.counted(0, 1)
            return self._misses.miss(side.spec, side.scripts, text, token, reply)
        except RedisError as exc:
            raise _unavailable(side.spec, text, exc) from None

    def get_many(self, entity: str, keys: Sequence[Key]) -> list[Row | None]:
        """The rows of `keys`, in order (None where absent): hits in one round trip,
        misses loaded with one batched SELECT where this process leads them (all of
        them, uncached, where Redis fails and on_redis_error = "database")."""
        side = self._entity(entity)
        texts = [self._texts(entity, k) for k in keys]
        unique = list(dict.fromkeys(texts))
        if not unique:
            return []
        try:
            values = self._get_many(side, unique)
        except _RedisFailed as exc:
            if side.spec.on_redis_error != "database":
                raise
            rows = self._from_database(side, unique, exc)
            return [rows[t] for t in texts]
        return [decode_row(values[t]) for t in texts]

    def _get_many(self, side: EntityReads, unique: list[str]) -> dict[str, str]:
        token = new_token()
        values: dict[str, str] = {}
        try:
            counts = side.due_counts()
            try:
                replies = side.scripts.read_many(
                    unique, token, side.refresh_below_ms(self._draw()), counts
                )
            except RedisError:
                side.counted(*counts)
                raise
            missed = []
            for text, reply in zip(unique, replies, strict=True):
                if reply.value is None:
                    missed.append((text, reply))
                else:
                    values[text] = reply.value
                    side.after_hit(reply, self.stats)
            side.counted(len(unique) - len(missed), len(missed))
            if missed:
                values.update(self._misses.miss_many(side.spec, side.scripts, token, missed))
        except RedisError as exc:
            raise _unavailable(side.spec, unique[0], exc) from None
        return values

    # -- Redis failing: on_redis_error = "database" ------------------------------

    def _from_database(
        self, side: EntityReads, texts: list[str], failed: _RedisFailed
    ) -> dict[str, Row | None]:
        """The rows of `texts` loaded from the database, not cached (Redis failed), as a
        hit would return them; at most `redis_error_reads` such loads of the entity at
        once in this process. BackendUnavailable when no turn came within
        `redis_error_wait`; LoadFailed when the database fails too."""
        spec = side.spec
        if not side.gate.acquire(timeout=spec.redis_error_wait_ms / 1000):
            emit("reads_from_database_refused", len(texts), entity=spec.name)
            raise BackendUnavailable(
                f'{failed} (on_redis_error = "database": {spec.redis_error_reads} '
                f"database reads of {spec.name} were under way in this process for "
                f"{spec.redis_error_wait_ms} ms; raise entities.{spec.name}."
                "redis_error_reads if the database can take more, or bring Redis back)"
            ) from None
        try:
            log.warning("read_from_database", entity=spec.name, keys=len(texts), error=str(failed))
            emit("reads_from_database", len(texts), entity=spec.name)
            loader = self._loader(spec)
            if len(texts) == 1:
                found = {texts[0]: loader.load(texts[0])}
            else:
                found = dict(loader.load_many(texts))
        finally:
            side.gate.release()
        return {
            t: decode_row(encode_entry(spec.name, t, found.get(t), spec.max_value_bytes))
            for t in texts
        }

    # -- hits -------------------------------------------------------------------

    def publish(self) -> None:
        """Add the hits and misses counted so far to Redis (at close)."""
        for side in self._entities.values():
            side.publish()

    # -- plumbing -------------------------------------------------------------

    def _draw(self) -> float:
        return 1.0 - self._random.random()  # in (0, 1]

    def _entity(self, name: str) -> EntityReads:
        found = self._entities.get(name)
        if found is None:
            found = EntityReads(self.context, self.settings.entity(name))
            self._entities[name] = found
        return found

    def _loader(self, spec: EntitySettings) -> SqlLoader:
        return loader_for(self.context, spec.name)


class _RedisFailed(BackendUnavailable):
    """A read's Redis call failed (what on_redis_error = "database" answers)."""


def _unavailable(spec: EntitySettings, key: str, exc: RedisError) -> BackendUnavailable:
    """A redis-py error as BackendUnavailable naming the entity and key."""
    return _RedisFailed(f"{spec.name}:{key}: Redis error on read: {exc}")
