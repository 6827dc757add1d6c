"""The script registry's scripts sent on redis.asyncio connections.

The same `.lua` files and SHAs as `scripts.Registry`, and the same KEYS and ARGV
(built by the typed script classes, `ReadScripts.read_call` and kin): only the send
differs. As the sync `Registry.call` does, this keeps connections of its own and
goes to them directly (hiredis-packed EVALSHA, send, read), past redis-py's command
layer and pool check-out; an unknown script is loaded and run again (NOSCRIPT: it
did not run). A call that is not safe to repeat (`resend=False`: enqueue) goes out
on a connection checked first, and a connection that breaks after it went out
raises ReplyLost: it is never sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cachewarden.scripts import ReplyLost, ScriptCall, source


class AsyncRegistry:
    """The scripts on one redis.asyncio client, at most `max_connections` calls at once."""

    def __init__(self, client: Redis, max_connections: int) -> None:
        self.client = client
        self._idle: list[AbstractConnection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._shas: dict[str, str] = {}

    def sha(self, name: str) -> str:
        """The SHA1 of script `name` (what EVALSHA names it by)."""
        found = self._shas.get(name)
        if found is None:
            found = hashlib.sha1(source(name).encode(), usedforsecurity=False).hexdigest()
            self._shas[name] = found
        return found

    async def call(self, name: str, keys: list[str], args: list[Any], resend: bool = True) -> Any:
        """Run script `name` once: its reply. A broken connection sends it once more on a
        fresh one when `resend`; without it, raises ReplyLost if it broke after sending."""
        command = hiredis.pack_command(("EVALSHA", self.sha(name), len(keys), *keys, *args))
        if not resend:
            return (await self._send(name, [command], lost=True))[0]
        try:
            return (await self._send(name, [command]))[0]
        except (RedisConnectionError, OSError):
            return (await self._send(name, [command]))[0]

    async def call_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run the calls (of one script) pipelined in one round trip (only for scripts
        that are safe to repeat: a broken connection sends them all once more)."""
        name = calls[0].name
        sha = self.sha(name)
        commands = [
            hiredis.pack_command(("EVALSHA", sha, len(keys), *keys, *args))
            for _, keys, args in calls
        ]
        try:
            return await self._send(name, commands)
        except (RedisConnectionError, OSError):
            return await self._send(name, commands)

    async def preload(self, names: Sequence[str]) -> None:
        """Load scripts `names` into Redis now (opening a connection)."""
        async with self._slots:
            conn = await self._take(fresh=False)
            try:
                for name in names:
                    await conn.send_packed_command(_load(name), check_health=False)
                    await conn.read_response()
            except BaseException:
                await _drop(conn)
                raise
            self._idle.append(conn)

    async def _send(self, name: str, commands: list[bytes], lost: bool = False) -> list[Any]:
        """Send `commands` (EVALSHAs of script `name`) on one connection and read their
        replies; NOSCRIPT loads the script and sends them again (none of them ran)."""
        async with self._slots:
            conn = await self._take(fresh=lost)
            try:
                await conn.send_packed_command(commands, check_health=False)
                replies = await _read(conn, len(commands), lost)
                if any(isinstance(r, NoScriptError) for r in replies):
                    await conn.send_packed_command([_load(name), *commands], check_health=False)
                    replies = (await _read(conn, len(commands) + 1, lost))[1:]
            except BaseException:
                await _drop(conn)
                raise
            self._idle.append(conn)
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

    async def _take(self, fresh: bool) -> AbstractConnection:
        """An idle connection, or a new one (it connects on first send); `fresh`: one the
        server has not closed while it sat idle (checked before anything is sent)."""
        while self._idle:
            conn = self._idle.pop()
            if not fresh:
                return conn
            try:
                if not await conn.can_read():
                    return conn
            except (RedisConnectionError, OSError):
                pass
            await _drop(conn)
        made: AbstractConnection = self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        return made

    async def close(self) -> None:
        """Close this registry's connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await _drop(conn)


def _load(name: str) -> bytes:
    """SCRIPT LOAD of script `name`, packed."""
    parts: tuple[Any, ...] = ("SCRIPT", "LOAD", source(name))
    packed: bytes = hiredis.pack_command(parts)
    return packed


async def _read(conn: AbstractConnection, count: int, lost: bool) -> list[Any]:
    """`count` replies on `conn`, an error reply as its exception (not raised); `lost`: a
    broken connection raises ReplyLost (the commands went out, so they may have run)."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if lost:
                raise ReplyLost(f"the connection broke before Redis answered: {exc}") from exc
            raise
    return replies


async def _drop(conn: AbstractConnection) -> None:
    """Close a connection broken, interrupted or holding an unread reply: never reused."""
    with suppress(Exception):
        await conn.disconnect(nowait=True)
