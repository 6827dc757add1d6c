"""Single flight: one load per key, everyone else waits for its value.

The algorithm, without Redis (the adapter is `readpath.misses`, on `scripts.readpath`):

- Across processes and hosts, a lease in Redis picks one loader per key (the
  read script takes it on a miss, with an owner token and `lock_timeout`).
  A reader that did not get it is a waiter: it polls the *entry* (not the lock)
  on the `WaitPolicy` schedule, from a few milliseconds up to a short cap,
  until the value appears. Each poll is the same read script, so when the
  loader's lease has expired (it crashed) the poll takes the lease over and that
  reader loads. Waiting is bounded by `wait_timeout`.
- While a load runs, its lease is extended every third of `lock_timeout`
  (`Renewer`: one background thread per process), so a load slower than
  `lock_timeout` keeps its one loader; a loader that dies stops extending, and its
  lease lapses within `lock_timeout`.
- Inside one process, `LocalFlights` lets one thread per key do the above while
  the process's other threads for that key wait on an event: a stampede of
  N threads in P processes costs P pollers, not N.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

T = TypeVar("T")


class Role(Enum):
    """What a reader that missed must do, as the read script decided."""

    WAIT = 0  # another loader holds the lease: wait for the value
    LOAD = 1  # this reader took the lease: load and fill
    PENDING_WRITE = 2  # a write of the key is pending and its entry is gone: wait
    FAILED = 3  # the last load failed moments ago: report its error


@dataclass(frozen=True)
class WaitPolicy:
    """How a waiter polls: first after `first_ms`, growing by `factor` up to `max_ms`.

    The cap is what a waiter can lag behind the fill, so it stays short: a
    waiter polls one key every `max_ms` at most, and one waiter per process
    and key polls (see LocalFlights).
    """

    timeout_ms: int
    first_ms: float = 2.0
    factor: float = 1.5
    max_ms: float = 10.0

    def sleeps(self, started: float) -> Waiter:
        """A schedule that began at monotonic time `started` (seconds)."""
        return Waiter(self, started)


class Waiter:
    """One waiter's schedule; `next_sleep(now)` is None once the timeout has passed."""

    def __init__(self, policy: WaitPolicy, started: float) -> None:
        self.policy = policy
        self.deadline = started + policy.timeout_ms / 1000
        self._next_ms = policy.first_ms

    def next_sleep(self, now: float) -> float | None:
        """Seconds to sleep before the next poll, or None when the wait is over."""
        left = self.deadline - now
        if left <= 0:
            return None
        sleep = min(self._next_ms / 1000, left)
        self._next_ms = min(self._next_ms * self.policy.factor, self.policy.max_ms)
        return sleep


class FlightTimeout(Exception):
    """A local flight did not finish within the time a follower was willing to wait."""


_WAITERS_LOCK = threading.Lock()


class Flight(Generic[T]):
    """One in-process read of a key: its leader resolves it, followers wait on it.

    Each follower waits on a lock of its own that the leader releases, so the
    followers wake up without queueing on a shared lock (as a Condition's waiters
    would, one after another), and a read that nobody follows costs no lock.
    """

    __slots__ = ("_done", "_error", "_value", "_waiters")

    def __init__(self) -> None:
        self._done = False
        self._waiters: list[threading.Lock] = []
        self._value: T | None = None
        self._error: BaseException | None = None

    def resolve(self, value: T) -> None:
        """Hand the value to every follower."""
        self._value = value
        self._finish()

    def fail(self, error: BaseException) -> None:
        """Hand the leader's error to every follower."""
        self._error = error
        self._finish()

    def _finish(self) -> None:
        with _WAITERS_LOCK:
            self._done = True
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.release()

    def wait(self, timeout: float) -> T:
        """The value; or a copy of the leader's error; or FlightTimeout."""
        if not self._done:
            waiter = threading.Lock()
            waiter.acquire()
            with _WAITERS_LOCK:
                waiting = not self._done
                if waiting:
                    self._waiters.append(waiter)
            if waiting and not waiter.acquire(timeout=timeout):
                with _WAITERS_LOCK:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
                if not self._done:
                    raise FlightTimeout(f"the in-process read did not finish within {timeout:.1f}s")
        if self._error is not None:
            # Each follower raises its own copy: one instance raised in many
            # threads would collect all of their tracebacks.
            raise copy.copy(self._error) from self._error
        return self._value  # type: ignore[return-value]


class LocalFlights(Generic[T]):
    """The loads in flight in this process, one per key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Hashable, Flight[T]] = {}

    def current(self, key: Hashable) -> Flight[T] | None:
        """The flight of `key`, if one is running (a lock-free look-up)."""
        return self._flights.get(key)

    def join(self, key: Hashable) -> tuple[Flight[T], bool]:
        """The flight of `key` and whether the caller leads it (started it)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight, False
            flight = Flight()
            self._flights[key] = flight
            return flight, True

    def land(self, key: Hashable, flight: Flight[T]) -> None:
        """Forget a finished flight, so the next miss of the key starts a new one."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]


class _Held:
    """One lease being kept: when it is next due, how often, and how to extend it."""

    __slots__ = ("due", "every_s", "extend", "live")

    def __init__(self, every_s: float, extend: Callable[[], bool]) -> None:
        self.every_s = every_s
        self.due = time.monotonic() + every_s
        self.extend = extend
        self.live = True


class Renewer:
    """Keeps leases alive while their loads run: calls each hold's `extend` every
    `every_s`, on one background thread (started on first use, again after a fork).

    `extend` does the extending (a Redis script) and returns False once the lease is
    no longer its holder's (voided by a write, or lapsed), which ends the hold early;
    it handles its own errors (a failed extension is tried again at the next tick).
    Leaving the block waits for an extension of its hold already under way, so no
    extension of it runs after the block.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held: list[_Held] = []
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._until = float("inf")  # when the thread wakes next, if nothing new comes
        self._running: _Held | None = None  # the hold being extended right now

    @contextmanager
    def hold(self, every_s: float, extend: Callable[[], bool]) -> Iterator[None]:
        """Extend a lease every `every_s` while the block runs (the first after `every_s`)."""
        held = _Held(every_s, extend)
        with self._cond:
            self._held.append(held)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._loop, name="cachewarden-lease-renewer", daemon=True
                )
                self._thread.start()
            elif held.due < self._until:
                self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                held.live = False
                if held in self._held:
                    self._held.remove(held)
                while self._running is held:  # an extension under way: let it finish
                    self._cond.wait()

    def _loop(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [h for h in self._held if h.due <= now]
                if not due:
                    self._until = min((h.due for h in self._held), default=float("inf"))
                    timeout = None if not self._held else self._until - now
                    self._cond.wait(timeout)
                    self._until = float("inf")
                    continue
                for held in due:
                    held.due = now + held.every_s
            for held in due:
                self._extend(held)

    def _extend(self, held: _Held) -> None:
        """Extend one hold, unless its block has exited; end it when its lease is lost."""
        with self._cond:
            if not held.live:
                return
            self._running = held
        kept = True
        try:
            kept = held.extend()
        except Exception:  # `extend` reports its own errors: try again at the next tick
            pass
        finally:
            with self._cond:
                self._running = None
                if not kept:
                    held.live = False
                    if held in self._held:
                        self._held.remove(held)
                self._cond.notify_all()


_renewer = Renewer()


def _forked() -> None:
    global _renewer
    _renewer = Renewer()  # the parent's thread and holds are not this process's


os.register_at_fork(after_in_child=_forked)


def renewer() -> Renewer:
    """This process's lease renewer."""
    return _renewer
