"""Read-through: `get` and `get_many` over Redis, the lease protocol and the loader.

A hit is one round trip (one EVALSHA of read.lua: the value, its TTL, whether a
refresh is queued, and the hot-key touch). A miss runs one loader per key across
every process and host (`cachewarden.singleflight`, `cachewarden.leases`); the
others wait for the value. A hit that is due for refresh (`cachewarden.xfetch`)
sets the key's refresh marker and sends one "cachewarden.refresh" task; the
reader returns the current value at once. Inside the stale grace (`stale_ttl`)
the old value is served while that refresh runs or keeps failing.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import structlog
from celery import Celery
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import Engine

from cachewarden.celeryconf import task_client
from cachewarden.codec import ABSENT, decode_row, key_text
from cachewarden.database import make_engine
from cachewarden.errors import BackendUnavailable
from cachewarden.keys import Keyspace
from cachewarden.leases import EntityLeases, Reply, new_token
from cachewarden.loader import Loader, Row
from cachewarden.loading import MissLoader, ReadStats
from cachewarden.refresh import REFRESH_TASK, SendRefresh
from cachewarden.scripts import Scripts
from cachewarden.settings import EntitySettings, Settings
from cachewarden.xfetch import EarlyRefresh

log = structlog.get_logger("cachewarden.readthrough")

# A read-triggered refresh covers the entry seen by the read (give or take
# the millisecond of jitter in PTTL); one reloaded since is left alone.
_HORIZON_SLACK_MS = 5


class ReadThrough:
    """The read path of one `Cache`: loaders, in-process flights and counters."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        keys: Keyspace,
        scripts: Scripts,
        send: SendRefresh | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.scripts = scripts
        self.stats = ReadStats()
        self._misses = MissLoader(self.stats, self._loader)
        self._send = send
        self._client: Celery | None = None
        self._engine: Engine | None = None
        self._loaders: dict[str, Loader] = {}
        self._sides: dict[str, EntityLeases] = {}
        self._rules: dict[str, EarlyRefresh] = {}
        self._lock = threading.Lock()
        self._random = random.Random()

    # -- public ---------------------------------------------------------------

    def get(self, entity: str, key: str | int) -> Row | None:
        """The row of `key`: from the cache, or loaded once across all processes."""
        spec = self._spec(entity)
        text = key_text(entity, key)
        flight = self._misses.current(entity, text)
        if flight is not None:
            return decode_row(self._misses.follow(spec, text, flight))
        side = self._side(spec)
        token = new_token()
        with _redis_errors(spec, text):
            reply = side.read(text, token)
            if reply.value is not None:
                self._after_hits(spec, side, [(text, reply)])
                return decode_row(reply.value)
            return decode_row(self._misses.miss(spec, side, text, token, reply))

    def get_many(self, entity: str, keys: Sequence[str | int]) -> list[Row | None]:
        """The rows of `keys`, in order (None where absent): hits in one round trip,
        misses loaded with one batched SELECT where this process leads them."""
        spec = self._spec(entity)
        texts = [key_text(entity, k) for k in keys]
        unique = list(dict.fromkeys(texts))
        if not unique:
            return []
        side = self._side(spec)
        token = new_token()
        values: dict[str, str] = {}
        with _redis_errors(spec, unique[0]):
            replies = side.read_many(unique, token)
            hits = [(t, r) for t, r in zip(unique, replies, strict=True) if r.value is not None]
            values.update((t, r.value) for t, r in hits if r.value is not None)
            self._after_hits(spec, side, hits)
            missed = [(t, r) for t, r in zip(unique, replies, strict=True) if r.value is None]
            if missed:
                values.update(self._misses.miss_many(spec, side, token, missed))
        return [decode_row(values[t]) for t in texts]

    def close(self) -> None:
        """Release the database engine and the task client."""
        if self._engine is not None:
            self._engine.dispose()
        if self._client is not None:
            self._client.close()

    # -- hits and refresh-ahead ----------------------------------------------

    def _after_hits(
        self, spec: EntitySettings, side: EntityLeases, hits: list[tuple[str, Reply]]
    ) -> None:
        """Count the hits and ask for a refresh of those due (one task for all)."""
        rule = self._rules.get(spec.name)
        if rule is None:
            rule = EarlyRefresh(spec.early_refresh, spec.refresh_ahead, spec.xfetch_beta)
            self._rules[spec.name] = rule
        due: list[str] = []
        horizon = requested = 0
        stale = 0
        for key, reply in hits:
            if reply.pttl_ms < 0:  # a pending write: the entry has no TTL yet
                continue
            ttl = spec.negative_ttl_ms if reply.value == ABSENT else spec.ttl_ms
            remaining = reply.pttl_ms - spec.stale_ttl_ms
            stale += remaining <= 0
            if reply.flag:  # a refresh of it is queued already
                continue
            delay = float(reply.extra) if reply.extra else None
            if rule.due(ttl, remaining, delay, 1.0 - self._random.random()):
                due.append(key)
                horizon = max(horizon, reply.now_ms + remaining + _HORIZON_SLACK_MS)
                requested = max(requested, reply.now_ms)
        self.stats.add(hits=len(hits) - stale, stale_hits=stale)
        if due:
            self._request_refresh(spec, side, due, horizon, requested)

    def _request_refresh(
        self, spec: EntitySettings, side: EntityLeases, keys: list[str], horizon: int, at: int
    ) -> None:
        try:
            marked = side.mark_refresh(keys)
            if marked:
                self._sender()(spec.name, marked, horizon, at)
        except Exception as exc:  # Redis or the broker is down: the reader still gets its value
            log.warning("refresh_not_sent", entity=spec.name, keys=len(keys), error=str(exc))
            return
        self.stats.add(refreshes_requested=len(marked))

    def _sender(self) -> SendRefresh:
        if self._send is None:
            with self._lock:
                if self._client is None:
                    self._client = task_client(self.settings)
                client = self._client

            def send(entity: str, keys: list[str], horizon: int | None, at: int | None) -> None:
                client.send_task(REFRESH_TASK, args=[entity, keys, horizon, at])

            self._send = send
        return self._send

    # -- plumbing -------------------------------------------------------------

    def _spec(self, entity: str) -> EntitySettings:
        return self.settings.entity(entity)

    def _side(self, spec: EntitySettings) -> EntityLeases:
        side = self._sides.get(spec.name)
        if side is None:
            side = EntityLeases(self.redis, self.keys, self.scripts, spec)
            self._sides[spec.name] = side
        return side

    def _loader(self, spec: EntitySettings) -> Loader:
        loader = self._loaders.get(spec.name)
        if loader is None:
            with self._lock:
                if self._engine is None:
                    self._engine = make_engine(self.settings.database)
                loader = self._loaders.get(spec.name)
                if loader is None:
                    loader = Loader(self._engine, spec, self.settings.source)
                    self._loaders[spec.name] = loader
        return loader


@contextmanager
def _redis_errors(spec: EntitySettings, key: str) -> Iterator[None]:
    """Translate redis-py errors into BackendUnavailable naming the entity and key."""
    try:
        yield
    except RedisError as exc:
        raise BackendUnavailable(f"{spec.name}:{key}: Redis error on read: {exc}") from None
