"""When a write counts as kept: confirmation by the primary's disk or by replicas.

`[redis] durability` (and an entity's own `durability`) says when `write()`,
`delete()` and their batch forms return:

- "primary": once the primary took the write (its reply). A host crash loses up
  to the AOF fsync interval; a failover loses the replication lag.
- "fsync": once the primary's AOF has it on disk (`WAITAOF 1 0`; Redis 7.2 or
  later, or Valkey, with `appendonly yes`).
- "replicas": once `[redis] replicas` replicas hold it (`WAIT N`).

A write that was taken but not confirmed within `durability_timeout` raises
DurabilityUnconfirmed: it is buffered and will be flushed, but a crash or a
failover could still lose it. A retry is safe (an idempotent upsert).

Group commit. WAIT and WAITAOF wait for the replication offset of the calling
connection's last write, and that offset covers every write any connection had
made before it (Redis applies commands one at a time). So one confirmation, a
write of a marker key and a WAIT (or WAITAOF) pipelined on one connection,
confirms every write whose reply came before the marker was sent. Writers that
finished their enqueue while a confirmation is in flight wait for the next one,
sent by the first of them (the leader) for all: N threads pay about one round
trip per round, not one each. `Confirmations` is the sync form; `cachewarden.aio`
has the asyncio one on the same rule.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from cachewarden.errors import DurabilityUnconfirmed

PRIMARY, FSYNC, REPLICAS = "primary", "fsync", "replicas"
MODES = (PRIMARY, FSYNC, REPLICAS)


@dataclass(frozen=True)
class Durability:
    """One durability level: the mode, the replica count it waits for, and how long."""

    mode: str = PRIMARY
    replicas: int = 0
    timeout_ms: int = 1000

    @property
    def waits(self) -> bool:
        """True when a write waits for a confirmation (any mode but "primary")."""
        return self.mode != PRIMARY

    def command(self) -> tuple[Any, ...]:
        """The confirming command: WAITAOF 1 0 t, or WAIT n t."""
        if self.mode == FSYNC:
            return ("WAITAOF", 1, 0, self.timeout_ms)
        return ("WAIT", self.replicas, self.timeout_ms)

    def met(self, reply: Any) -> bool:
        """True when the confirming command's reply says the write is kept."""
        if self.mode == FSYNC:
            return int(reply[0]) >= 1
        return int(reply) >= self.replicas

    def describe(self) -> str:
        """What confirms a write, for messages."""
        if self.mode == FSYNC:
            return "the primary's fsync of its AOF (WAITAOF 1 0)"
        return f"{self.replicas} replica(s) (WAIT {self.replicas})"


def unconfirmed(durability: Durability, problem: str) -> DurabilityUnconfirmed:
    """The error of writes that were taken but not confirmed (the message says why)."""
    return DurabilityUnconfirmed(
        f"the write was taken and is buffered (it will be flushed), but {durability.describe()} "
        f"did not confirm it within {durability.timeout_ms} ms ({problem}): a crash or a "
        "failover now could lose it. Retrying it is safe: the flush is an idempotent upsert"
    )


class GroupCommit:
    """Rounds of one confirmation shared by the callers that arrived before it started.

    `confirm()` returns once a round that started after the call has succeeded, and
    raises that round's error otherwise. `send` runs one round (the caller that
    finds no round in flight runs it, for everyone waiting)."""

    def __init__(self, send: Callable[[], None]) -> None:
        self._send = send
        self._cond = threading.Condition()
        self._started = 0  # rounds begun
        self._finished = 0  # rounds ended
        self._running = False
        self._error: BaseException | None = None  # the latest ended round's

    def confirm(self) -> None:
        with self._cond:
            # A round already in flight may have sent its marker before this caller's
            # write: only a later round covers it.
            wanted = self._started + 1
            while True:
                if self._finished >= wanted:
                    if self._error is not None:
                        # Each caller its own error (one object raised in many threads
                        # would share one traceback).
                        raise DurabilityUnconfirmed(str(self._error)) from self._error
                    return
                if not self._running:
                    self._running = True
                    self._started += 1
                    round_ = self._started
                    break
                self._cond.wait()
        error: BaseException | None = None
        try:
            self._send()
        except BaseException as exc:  # handed to every caller of this round
            error = exc
        with self._cond:
            self._running = False
            self._finished = round_
            self._error = error
            self._cond.notify_all()
        if error is not None:
            raise error


class Confirmations:
    """The group commits of one process, one per durability level, on one client.

    `client` should wait longer than the confirmation's own timeout (connections
    build it with the durability timeout added to its socket timeout)."""

    def __init__(self, client: Redis, marker: str) -> None:
        self._client = client
        self._marker = marker
        self._groups: dict[Durability, GroupCommit] = {}
        self._lock = threading.Lock()

    def confirm(self, durability: Durability) -> None:
        """Return once every write this process had taken before the call is kept as
        `durability` says; raise DurabilityUnconfirmed when it is not."""
        if not durability.waits:
            return
        group = self._groups.get(durability)
        if group is None:
            with self._lock:
                group = self._groups.setdefault(
                    durability, GroupCommit(lambda: self._round(durability))
                )
        group.confirm()

    def _round(self, durability: Durability) -> None:
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.set(self._marker, "1")
                pipe.execute_command(*durability.command())  # type: ignore[no-untyped-call]
                reply = pipe.execute()[1]
        except RedisError as exc:
            raise unconfirmed(durability, f"{type(exc).__name__}: {exc}") from exc
        if not durability.met(reply):
            raise unconfirmed(durability, f"{durability.command()[0]} answered {reply!r}")

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()
