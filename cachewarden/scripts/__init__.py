"""The script registry: the Lua scripts in this folder, read once per process.

Each `.lua` file has exactly one typed Python function that owns its KEYS and
ARGV order, in the module of its job family beside it (`writebehind.py`,
`readpath.py`); nothing else knows the order. Every key a script touches
arrives in its KEYS: no script builds a key name, so a Redis Cluster port
needs hash tags, not a rewrite.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import hiredis
from redis import Redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

Client = Redis | Pipeline


@cache
def source(name: str) -> str:
    """The text of one script, for clients in other languages (`EVAL`)."""
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


class Registry:
    """The scripts registered on one Redis client (EVALSHA, reloaded on NOSCRIPT)."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self._scripts: dict[str, Script] = {}

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

    def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run script `name` on a connection of the pool, with nothing in between.

        The read path's hit is one `EVALSHA`; redis-py's command layer (retries,
        observability hooks, response callbacks) costs more per call than the script
        itself, so this goes to the connection directly: pack, send, read. A broken
        connection is dropped and the call tried once more on a fresh one, as
        redis-py does; an unknown script is loaded and run again.
        """
        script = self.script(name)
        command = hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))
        try:
            return self._send(script, command)
        except (RedisConnectionError, OSError):
            return self._send(script, command)  # once more, on a fresh connection

    def _send(self, script: Script, command: bytes) -> Any:
        pool = self.client.connection_pool
        conn: Any = pool.get_connection()
        try:
            conn.send_packed_command([command])
            try:
                return conn.read_response()
            except NoScriptError:
                conn.send_packed_command(conn.pack_command("SCRIPT", "LOAD", script.script))
                conn.read_response()
                conn.send_packed_command([command])
                return conn.read_response()
        except (RedisConnectionError, OSError):
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
