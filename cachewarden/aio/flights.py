"""Single flight inside one event loop: one coroutine per key reads (and loads), the
others await its outcome. The asyncio form of `readpath.singleflight.LocalFlights`;
across processes the Redis lease decides (read.lua), as for threads. No Redis here.

A follower costs a shielded await and nothing more (one timer per flight bounds them
all), so that a stampede of coroutines wakes up without stalling the loop.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Hashable
from typing import Generic, TypeVar

from cachewarden.readpath.singleflight import FlightTimeout

T = TypeVar("T")


class LeaderGone(Exception):
    """The coroutine leading a flight was cancelled: a follower reads the key itself."""


class AsyncFlights(Generic[T]):
    """The reads in flight in this event loop, one per key (a future each)."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, asyncio.Future[T]] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}

    def join(self, key: Hashable, timeout: float) -> tuple[asyncio.Future[T], bool]:
        """The flight of `key` and whether the caller leads it (started it). Its first
        follower bounds it: after `timeout` seconds its followers get FlightTimeout."""
        flight = self._flights.get(key)
        if flight is not None:
            if key not in self._timers:
                loop = asyncio.get_running_loop()
                self._timers[key] = loop.call_later(timeout, _expire, flight, timeout)
            return flight, False
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        return flight, True

    def land(self, key: Hashable, flight: asyncio.Future[T]) -> None:
        """Forget a finished flight, so the next miss of the key starts a new one."""
        if self._flights.get(key) is flight:
            del self._flights[key]
            timer = self._timers.pop(key, None)
            if timer is not None:
                timer.cancel()


def resolve(flight: asyncio.Future[T], value: T) -> None:
    """Hand the leader's value to every follower (unless they timed out already)."""
    if not flight.done():
        flight.set_result(value)


def fail(flight: asyncio.Future[T], error: BaseException) -> None:
    """End a flight with its leader's error (or, cancelled, with LeaderGone for all)."""
    if flight.done():
        return
    if isinstance(error, Exception):
        flight.set_exception(error)
        flight.exception()  # retrieved: no "never retrieved" report when nobody follows
    else:
        flight.cancel()


def _expire(flight: asyncio.Future[T], timeout: float) -> None:
    fail(flight, FlightTimeout(f"the in-process read did not finish within {timeout:.1f}s"))


async def follow(flight: asyncio.Future[T]) -> T:
    """The flight's value; or a copy of its leader's error; FlightTimeout; LeaderGone."""
    try:
        return await asyncio.shield(flight)
    except asyncio.CancelledError:
        if flight.cancelled():
            raise LeaderGone() from None
        raise
    except Exception as exc:
        # Each follower raises its own copy: one instance raised in many tasks would
        # collect all of their tracebacks.
        raise copy.copy(exc) from exc
