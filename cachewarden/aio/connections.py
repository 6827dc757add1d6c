"""redis.asyncio clients built as connections.py builds the sync ones.

A blocking pool with the application's timeouts, on the URL's server or on the
primary its sentinels name (following a failover as the sync client does).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio.sentinel as async_sentinel
from redis.asyncio import BlockingConnectionPool, Redis

from cachewarden.connections import pool_options, sentinel_options
from cachewarden.settings import RedisSettings


class AsyncBlockingSentinelPool(async_sentinel.SentinelConnectionPool, BlockingConnectionPool):
    """connections.BlockingSentinelPool for redis.asyncio."""


class AsyncFollowingConnection(async_sentinel.SentinelManagedConnection):
    """connections.FollowingConnection for redis.asyncio: a reconnect asks the sentinels."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]
        await super().send_packed_command(command, check_health)


def async_redis_client(settings: RedisSettings, wait_ms: int = 0) -> Redis:
    """A redis.asyncio client returning str values, as `connections.redis_client` builds
    the sync one (a blocking pool, an application's timeouts, `[redis] socket_timeout`
    and `connect_timeout`; `wait_ms` more for a client whose calls block on the server,
    a durability confirmation's WAIT), through the sentinels where there are some."""
    options = pool_options(settings, worker=False)
    if wait_ms:
        options["socket_timeout"] = (options["socket_timeout"] or 0) + wait_ms / 1000
    if not settings.sentinels:
        return Redis(connection_pool=BlockingConnectionPool.from_url(settings.url, **options))
    data, sentinel_kwargs = sentinel_options(settings, options)
    sentinel = async_sentinel.Sentinel(
        list(settings.sentinels), sentinel_kwargs=sentinel_kwargs, **data
    )
    client: Redis = sentinel.master_for(
        settings.service,
        redis_class=Redis,
        connection_pool_class=AsyncBlockingSentinelPool,
        connection_class=AsyncFollowingConnection,
        max_connections=options["max_connections"],
        timeout=options["timeout"],
    )
    return client
