"""Durability confirmations for asyncio writers: durability.py's group commit, awaited.

The rule is the sync one (see cachewarden.durability): a marker write and a WAIT (or
WAITAOF) pipelined on one connection confirm every write acknowledged before they
were sent, so the coroutines whose writes finished while a round was in flight share
the next round, sent by the first of them.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cachewarden.durability import Durability, unconfirmed
from cachewarden.errors import DurabilityUnconfirmed


class _Rounds:
    """The rounds of one durability level on one loop."""

    def __init__(self, client: Redis, marker: str, durability: Durability) -> None:
        self._client = client
        self._marker = marker
        self._durability = durability
        self._started = 0
        self._finished = 0
        self._running: asyncio.Future[None] | None = None
        self._error: DurabilityUnconfirmed | None = None

    async def confirm(self) -> None:
        wanted = self._started + 1  # a round in flight may predate this caller's write
        while True:
            if self._finished >= wanted:
                if self._error is not None:
                    raise DurabilityUnconfirmed(str(self._error)) from self._error
                return
            if self._running is None:
                break
            await asyncio.shield(self._running)
        self._started += 1
        round_ = self._started
        self._running = asyncio.get_running_loop().create_future()
        error: DurabilityUnconfirmed | None = None
        try:
            await self._send()
        except DurabilityUnconfirmed as exc:
            error = exc
        except BaseException:  # cancelled: the coroutines waiting on it are not confirmed
            error = unconfirmed(self._durability, "the confirming call was cancelled")
            raise
        finally:
            running, self._running = self._running, None
            self._finished, self._error = round_, error
            running.set_result(None)
        if error is not None:
            raise error

    async def _send(self) -> None:
        durability = self._durability
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(self._marker, "1")
                pipe.execute_command(*durability.command())
                reply = (await pipe.execute())[1]
        except RedisError as exc:
            raise unconfirmed(durability, f"{type(exc).__name__}: {exc}") from exc
        if not durability.met(reply):
            raise unconfirmed(durability, f"{durability.command()[0]} answered {reply!r}")


class AsyncConfirmations:
    """One loop's group commits, one per durability level, on one client (whose socket
    timeout is longer than the levels' own)."""

    def __init__(self, client: Redis, marker: str) -> None:
        self._client = client
        self._marker = marker
        self._rounds: dict[Durability, _Rounds] = {}

    async def confirm(self, durability: Durability) -> None:
        """Return once every write this loop had taken before the call is kept as
        `durability` says; raise DurabilityUnconfirmed when it is not."""
        if not durability.waits:
            return
        rounds = self._rounds.get(durability)
        if rounds is None:
            rounds = self._rounds[durability] = _Rounds(self._client, self._marker, durability)
        await rounds.confirm()

    async def close(self) -> None:
        await self._client.aclose()
        await self._client.connection_pool.disconnect()
