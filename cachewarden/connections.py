"""Redis clients and the safety checks run before a process relies on Redis.

Clients are built by these factories after fork, never at import time.
"""

from __future__ import annotations

from typing import Any

from redis import BlockingConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cachewarden.errors import BackendUnavailable, UnsafeRedis
from cachewarden.settings import RedisSettings

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


MAX_CONNECTIONS = 512
POOL_TIMEOUT_S = 10

_worker = False  # this process is a worker's (or the scheduler's): the worker timeouts


def as_worker() -> None:
    """Mark this process as one of the worker's (its clients take the worker's
    timeouts); the Celery app, `install` and the scheduler call it."""
    global _worker
    _worker = True


def redis_client(settings: RedisSettings, worker: bool | None = None) -> Redis:
    """A client for `settings.url` returning str values, on a blocking pool.

    Past MAX_CONNECTIONS busy connections a caller waits (up to POOL_TIMEOUT_S)
    for one to come back instead of failing: an application with hundreds of
    threads on one Cache queues rather than errors. A call waits at most the socket
    timeout for Redis to answer (`[redis] socket_timeout`, 1 s in an application;
    `worker_socket_timeout`, 30 s, in a worker's processes), so a Redis that accepts
    connections and never answers costs a request about a second, not thirty.
    """
    options = pool_options(settings, _worker if worker is None else worker)
    return Redis(connection_pool=BlockingConnectionPool.from_url(settings.url, **options))


def pool_options(settings: RedisSettings, worker: bool) -> dict[str, Any]:
    """The blocking pool's options for `settings`, sync or asyncio alike: str values,
    the application's or the worker's timeouts, MAX_CONNECTIONS, TLS for rediss://."""
    socket_s, connect_s = settings.timeouts_s(worker)
    return {
        "decode_responses": True,
        "socket_connect_timeout": connect_s,
        "socket_timeout": socket_s,
        "health_check_interval": 30,
        "max_connections": MAX_CONNECTIONS,
        "timeout": POOL_TIMEOUT_S,
        **(settings.tls if settings.url.startswith("rediss://") else {}),
    }


def check_redis_safety(client: Redis, settings: RedisSettings) -> list[str]:
    """Refuse (or warn about) a Redis that could evict or forget the write buffer.

    Returns the warnings; raises UnsafeRedis when a check fails and
    `unsafe_policy` is "refuse".
    """
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy", "")
        persistence = client.info("persistence")
    except REDIS_DOWN as exc:
        raise BackendUnavailable(f"Redis at {settings.shown} is unreachable: {exc}") from None
    except RedisError:
        return ["CONFIG GET is not allowed here; could not check maxmemory-policy"]
    problems: list[str] = []
    if str(policy).startswith("allkeys-"):
        problems.append(
            f"Redis maxmemory-policy is {policy!r}: it may evict the write buffer. "
            "Set it to 'noeviction' or a 'volatile-*' policy."
        )
    warnings: list[str] = []
    if not persistence.get("aof_enabled"):
        warnings.append(
            "Redis AOF is off: a Redis crash loses buffered writes not yet flushed. "
            "Enable 'appendonly yes' with 'appendfsync everysec' in production."
        )
    if problems and settings.unsafe_policy == "refuse":
        raise UnsafeRedis(problems[0] + ' (or set [redis] unsafe_policy = "warn" to run anyway)')
    return problems + warnings
