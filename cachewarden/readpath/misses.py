"""Loading missed keys: one loader per key across processes, hosts and threads.

The algorithm is `readpath.singleflight`; the Redis side is
`scripts.readpath`. A read joins this process's flight for the key before it
talks to Redis (one thread per process and key does); on a miss the flight's
leader loads under the key's lease, or polls the entry until another process's
loader fills it.
`get_many` loads the keys whose leases it took with one `SELECT ... IN`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog
from redis.exceptions import RedisError

from cachewarden.codec import encode_entry
from cachewarden.errors import InvalidValue, LoadFailed
from cachewarden.readpath.singleflight import (
    Flight,
    FlightTimeout,
    LocalFlights,
    Role,
    WaitPolicy,
    renewer,
)
from cachewarden.readpath.sqlload import SqlLoader
from cachewarden.scripts.readpath import ReadScripts, Reply
from cachewarden.settings import EntitySettings

log = structlog.get_logger("cachewarden.readpath")


@contextmanager
def leases_kept(side: ReadScripts, keys: Sequence[str], token: str) -> Iterator[None]:
    """Extend our leases of `keys` every third of `lock_timeout` while the block (their
    load) runs, so that a slow load keeps one loader per key."""
    held = list(keys)

    def extend() -> bool:
        try:
            return side.extend(held, token) > 0
        except RedisError as exc:  # tried again at the next tick; the fill tells the rest
            log.warning("lease_extend_failed", entity=side.spec.name, error=str(exc))
            return True

    with renewer().hold(side.spec.lock_timeout_ms / 3000, extend):
        yield


@dataclass
class ReadStats:
    """This process's read-path counters (the cross-process ones live in Redis).

    `hits`, `stale_hits` and `misses` count what Redis answered the reads that
    asked it; `waits` counts reads that waited for another thread's read of the
    same key instead (in a stampede, all but one per process).
    """

    hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    loads: int = 0
    load_errors: int = 0
    waits: int = 0
    refreshes_requested: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hit(self, stale: bool, asked: int) -> None:
        """Count one hit (or stale hit) and whether it asked for a refresh."""
        with self._lock:
            if stale:
                self.stale_hits += 1
            else:
                self.hits += 1
            self.refreshes_requested += asked

    def add(self, **counts: int) -> None:
        """Add to counters by name."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict."""
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class MissLoader:
    """Resolves misses to entry values (JSON text), loading each key once."""

    def __init__(self, stats: ReadStats, loader: Callable[[EntitySettings], SqlLoader]) -> None:
        self.stats = stats
        self._loader = loader
        self._flights: LocalFlights[str] = LocalFlights()

    @property
    def flights(self) -> LocalFlights[str]:
        """This process's reads in flight, one per entity and key."""
        return self._flights

    def miss(
        self, spec: EntitySettings, side: ReadScripts, key: str, token: str, reply: Reply
    ) -> str:
        """A miss seen by the leader of the key's flight: load it under the lease, or wait
        for another process's load."""
        self.stats.add(misses=1)
        return self._resolve(spec, side, key, token, reply)

    def follow(self, spec: EntitySettings, key: str, flight: Flight[str]) -> str:
        """Wait for this process's flight of the key (its leader is bounded, so are we)."""
        self.stats.add(waits=1)
        budget = (spec.wait_timeout_ms + spec.lock_timeout_ms) / 1000 + 1
        try:
            return flight.wait(budget)
        except FlightTimeout:
            raise LoadFailed(spec.name, key, _timeout_problem(spec)) from None

    def _resolve(
        self, spec: EntitySettings, side: ReadScripts, key: str, token: str, reply: Reply
    ) -> str:
        """Load under the lease, or wait for the value polling the entry (not the lock)."""
        waiter = None
        while True:
            if reply.value is not None:
                return reply.value
            role = Role(reply.flag)
            if role is Role.LOAD:
                return self._load(spec, side, key, token)
            if role is Role.FAILED:
                raise LoadFailed(spec.name, key, reply.extra or "the last load failed")
            if waiter is None:
                waiter = WaitPolicy(spec.wait_timeout_ms).sleeps(time.monotonic())
            sleep = waiter.next_sleep(time.monotonic())
            if sleep is None:
                raise LoadFailed(spec.name, key, _timeout_problem(spec))
            time.sleep(sleep)
            reply = side.read(key, token)

    def _load(self, spec: EntitySettings, side: ReadScripts, key: str, token: str) -> str:
        """Load one key under our lease and fill it; return the entry's value."""
        started = time.monotonic()
        try:
            with leases_kept(side, [key], token):
                row = self._loader(spec).load(key)
                value = encode_entry(spec.name, key, row, spec.max_value_bytes)
        except LoadFailed as exc:
            side.give_up([key], token, exc.problem, counter="load_errors")
            self.stats.add(load_errors=1)
            log.warning("load_failed", entity=spec.name, key=key, error=exc.problem)
            raise
        except BaseException:
            side.give_up([key], token)
            raise
        load_ms = int((time.monotonic() - started) * 1000)
        filled, current = side.fill(key, token, value, load_ms)
        self.stats.add(loads=1)
        # Refused: a write or delete came after the load began; its value wins.
        return value if filled or current is None else current

    def miss_many(
        self, spec: EntitySettings, side: ReadScripts, token: str, missed: list[tuple[str, Reply]]
    ) -> dict[str, str]:
        """Misses of `get_many`: one batched load for the keys this process leads."""
        self.stats.add(misses=len(missed))
        led: list[tuple[str, Reply, Flight[str]]] = []
        following: list[tuple[str, Flight[str]]] = []
        for key, reply in missed:
            flight, leads = self._flights.join((spec.name, key))
            if leads:
                led.append((key, reply, flight))
                continue
            if reply.flag == Role.LOAD.value:
                side.give_up([key], token)
            following.append((key, flight))
        try:
            values, errors = self._lead_many(spec, side, token, led)
        finally:
            for key, _, flight in led:
                self._flights.land((spec.name, key), flight)
        for key, flight in following:
            values[key] = self.follow(spec, key, flight)
        if errors:
            raise errors[0]
        return values

    def _lead_many(
        self,
        spec: EntitySettings,
        side: ReadScripts,
        token: str,
        led: list[tuple[str, Reply, Flight[str]]],
    ) -> tuple[dict[str, str], list[Exception]]:
        """Resolve the flights this call leads: batch-load those whose lease we took."""
        values: dict[str, str] = {}
        errors: list[Exception] = []
        try:
            batch = [k for k, r, _ in led if r.flag == Role.LOAD.value]
            if batch:
                values.update(self._load_batch(spec, side, batch, token))
        except BaseException as exc:
            for _, _, flight in led:
                flight.fail(exc)
            raise
        for key, reply, flight in led:
            try:
                if key not in values:
                    values[key] = self._resolve(spec, side, key, token, reply)
                flight.resolve(values[key])
            except Exception as exc:
                flight.fail(exc)
                errors.append(exc)
        return values, errors

    def _load_batch(
        self, spec: EntitySettings, side: ReadScripts, keys: list[str], token: str
    ) -> dict[str, str]:
        """One SELECT ... IN for the keys we hold leases on, then one pipelined fill."""
        started = time.monotonic()
        try:
            with leases_kept(side, keys, token):
                rows = self._loader(spec).load_many(keys)
        except LoadFailed as exc:
            side.give_up(keys, token, exc.problem, counter="load_errors")
            self.stats.add(load_errors=1)
            log.warning("load_failed", entity=spec.name, keys=len(keys), error=exc.problem)
            raise
        except BaseException:
            side.give_up(keys, token)
            raise
        encoded: dict[str, str] = {}
        for key in keys:
            row = rows.get(key)
            try:
                encoded[key] = encode_entry(spec.name, key, row, spec.max_value_bytes)
            except InvalidValue:
                side.give_up([key], token)
                raise
        load_ms = int((time.monotonic() - started) * 1000)
        outcome = side.fill_each(encoded, token, load_ms)
        self.stats.add(loads=len(keys))
        return {
            key: encoded[key] if filled or current is None else current
            for key, (filled, current) in outcome.items()
        }


def _timeout_problem(spec: EntitySettings) -> str:
    return (
        f"waited {spec.wait_timeout_ms} ms for another process's load of it and none "
        f"finished (entities.{spec.name}.wait_timeout); is the database slow?"
    )
