"""The script registry: the Lua scripts in this folder, read once per process.

Each `.lua` file has exactly one typed Python function that owns its KEYS and
ARGV order, in the module of its job family beside it (`writebehind.py`,
`readpath.py`); nothing else knows the order. Every key a script touches
arrives in its KEYS: no script builds a key name, so a Redis Cluster port
needs hash tags, not a rewrite.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import cache
from importlib import resources
from typing import Any, NamedTuple

import hiredis
from redis import Redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

Client = Redis | Pipeline


class ScriptCall(NamedTuple):
    """One call of a script as its typed function builds it: the script's name, its KEYS
    and ARGV. `Registry.call(*c)` sends it; so does the asyncio registry (cachewarden.aio)."""

    name: str
    keys: list[str]
    args: list[Any]


class ReplyLost(RedisConnectionError):
    """The connection broke after a command that is not safe to repeat went out: Redis
    may have run it. It is never sent again by the registry."""


@cache
def source(name: str) -> str:
    """The text of one script, for clients in other languages (`EVAL`)."""
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


class Registry:
    """The scripts registered on one Redis client (EVALSHA, reloaded on NOSCRIPT)."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self._scripts: dict[str, Script] = {}
        self._idle: list[Any] = []  # connections of `call`, taken from the pool once
        self._born = _generation

    def script(self, name: str) -> Script:
        """The registered script `name`, registered on first use."""
        found = self._scripts.get(name)
        if found is None:
            found = self.client.register_script(source(name))
            self._scripts[name] = found
        return found

    def run(self, name: str, keys: list[str], args: list[Any], client: Client | None = None) -> Any:
        """Run script `name` on this client (or on a pipeline of it)."""
        return self.script(name)(keys=keys, args=args, client=client or self.client)

    def call(self, name: str, keys: list[str], args: list[Any], resend: bool = True) -> Any:
        """Run script `name` on a connection of its own, with nothing in between.

        The read path's hit is one `EVALSHA`; redis-py's command layer (retries,
        observability hooks, response callbacks) and its pool's check-out (about
        15 us on redis-py 8) cost more per call than the script itself, so this
        keeps a stack of connections taken from the client's pool once and goes to
        them directly: pack, send, read. An unknown script is loaded and run again.
        `close()` hands the connections back.

        A broken connection is dropped and the call tried once more on a fresh one
        when `resend` (the script may run twice: only for scripts that are safe to
        repeat). Without it, a connection the server closed while idle is found before
        anything is sent (and replaced), and a connection that breaks after the command
        went out raises: the script may have run, so it is never sent again (an
        `XADD` resent would be a second write).
        """
        script = self.script(name)
        command = hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))
        if not resend:
            return self._send(script, command, fresh=True)
        try:
            return self._send(script, command)
        except (RedisConnectionError, OSError):
            return self._send(script, command)  # once more, on a fresh connection

    def command(self, *parts: Any) -> Any:
        """Any command that is safe to repeat, on `call`'s connections: packed by hiredis,
        its reply as hiredis parsed it (nested lists, no redis-py response callback). For
        the flusher's stream reads, where redis-py's parsing into dicts costs more than
        the read. A broken connection sends it once more, on a fresh one."""
        command = hiredis.pack_command(parts)
        try:
            return self._send(None, command)
        except (RedisConnectionError, OSError):
            return self._send(None, command)

    def send(self, *parts: Any) -> InFlight:
        """Send a command that is safe to repeat now, on a connection of `call`'s, and read
        its reply later (`InFlight.reply`, which sends it again on a broken connection):
        the flusher's next stream read travels while the database applies the batch
        before it."""
        return self._send_later(hiredis.pack_command(parts), lambda: self.command(*parts))

    def send_script(self, name: str, keys: list[str], args: list[Any]) -> InFlight:
        """`call(resend=False)`, with the reply read later (`InFlight.reply`): the
        flusher's finish.lua runs while the database applies the next batch. A broken
        connection raises when the reply is read (the script may have run)."""
        script = self.script(name)
        command = hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))
        return self._send_later(
            command, lambda: self.call(name, keys, args, resend=False), resend=False
        )

    def _send_later(
        self, command: bytes, again: Callable[[], Any], resend: bool = True
    ) -> InFlight:
        conn = self._take(fresh=not resend)
        try:
            conn.send_packed_command([command])
        except (RedisConnectionError, OSError):
            self._drop(conn)
            if not resend:
                raise
            return InFlight(self, None, again)  # sent again, at once, when read
        except BaseException:
            self._drop(conn)
            raise
        return InFlight(self, conn, again, resend)

    def preload(self, names: Iterable[str]) -> None:
        """Load scripts `names` into Redis through `call`'s connections (opening one)."""
        for name in names:
            script = self.script(name)
            parts: tuple[Any, ...] = ("SCRIPT", "LOAD", source(name))
            command = hiredis.pack_command(parts)
            self._send(script, command)

    def _take(self, fresh: bool = False) -> Any:
        """A connection; `fresh`: one the server has not closed (an idle connection whose
        socket reads as closed or holds stray bytes is dropped before anything is sent)."""
        if self._born != _generation:
            self._forget()
        while self._idle:
            conn = self._idle.pop()
            if not fresh:
                return conn
            try:
                if not conn.can_read(timeout=0):
                    return conn
            except (RedisConnectionError, OSError):
                pass
            self._drop(conn)
        return self.client.connection_pool.get_connection()

    def _drop(self, conn: Any) -> None:
        """A connection broken, interrupted or holding an unread reply: never reused."""
        conn.disconnect()
        self.client.connection_pool.release(conn)

    def _keep(self, conn: Any) -> None:
        """A connection whose replies are all read: back to the stack (not across a fork)."""
        if self._born == _generation:
            self._idle.append(conn)

    def _send(self, script: Script | None, command: bytes, fresh: bool = False) -> Any:
        conn = self._take(fresh)
        try:
            conn.send_packed_command([command])
            try:
                reply = self._read(conn, lost=fresh)
            except NoScriptError:
                if script is None:
                    raise
                conn.send_packed_command(conn.pack_command("SCRIPT", "LOAD", script.script))
                conn.read_response()
                conn.send_packed_command([command])
                reply = self._read(conn, lost=fresh)
        except BaseException:
            self._drop(conn)
            raise
        self._idle.append(conn)
        return reply

    @staticmethod
    def _read(conn: Any, lost: bool) -> Any:
        """The reply on `conn`; `lost`: a broken connection raises ReplyLost (the command
        went out, so it may have run)."""
        if not lost:
            return conn.read_response()
        try:
            return conn.read_response()
        except NoScriptError:
            raise
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise ReplyLost(f"the connection broke before Redis answered: {exc}") from exc

    def _forget(self) -> None:
        """After a fork: the parent's connections are not this process's to use."""
        self._idle = []
        self._born = _generation

    def close(self) -> None:
        """Hand this registry's connections back to the client's pool."""
        if self._born != _generation:
            self._forget()
        idle, self._idle = self._idle, []
        for conn in idle:
            self.client.connection_pool.release(conn)


class InFlight:
    """A command `Registry.send` or `send_script` sent, whose reply is still to be read."""

    def __init__(
        self, registry: Registry, conn: Any, again: Callable[[], Any], resend: bool = True
    ) -> None:
        self._registry = registry
        self._conn: Any = conn
        self._again = again  # the command run now, as `command` or `call` would run it
        self._resend = resend  # whether a broken connection may send it again
        self._done = False

    def reply(self) -> Any:
        """The reply. An unknown script is loaded and run (it did not run). A broken
        connection sends the command once more if it is safe to repeat, else raises."""
        if self._done:
            raise RuntimeError("this reply was already read or cancelled")
        self._done = True
        conn, self._conn = self._conn, None
        if conn is None:
            return self._again()
        registry = self._registry
        try:
            reply = registry._read(conn, lost=not self._resend)
        except NoScriptError:
            registry._keep(conn)
            return self._again()
        except (RedisConnectionError, OSError):
            registry._drop(conn)
            if not self._resend:
                raise
            return self._again()
        except BaseException:
            registry._drop(conn)
            raise
        registry._keep(conn)
        return reply

    def cancel(self) -> None:
        """Give the reply up: its connection is closed, never reused with it unread."""
        self._done = True
        conn, self._conn = self._conn, None
        if conn is not None:
            self._registry._drop(conn)


_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_forked)
