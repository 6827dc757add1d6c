"""Redis clients and the safety checks run before a process relies on Redis.

Clients are built by these factories after fork, never at import time.
"""

from __future__ import annotations

from typing import Any

from redis import BlockingConnectionPool, Redis
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from cachewarden.durability import FSYNC
from cachewarden.errors import BackendUnavailable, ConfigError, UnsafeRedis
from cachewarden.settings import RedisSettings, Settings

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


MAX_CONNECTIONS = 512
POOL_TIMEOUT_S = 10

_worker = False  # this process is a worker's (or the scheduler's): the worker timeouts


def as_worker() -> None:
    """Mark this process as one of the worker's (its clients take the worker's
    timeouts); the Celery app, `install` and the scheduler call it."""
    global _worker
    _worker = True


def redis_client(settings: RedisSettings, worker: bool | None = None, wait_ms: int = 0) -> Redis:
    """A client for `settings.url` returning str values, on a blocking pool.

    Past MAX_CONNECTIONS busy connections a caller waits (up to POOL_TIMEOUT_S)
    for one to come back instead of failing: an application with hundreds of
    threads on one Cache queues rather than errors. A call waits at most the socket
    timeout for Redis to answer (`[redis] socket_timeout`, 1 s in an application;
    `worker_socket_timeout`, 30 s, in a worker's processes), so a Redis that accepts
    connections and never answers costs a request about a second, not thirty.
    `wait_ms`: the calls wait that much longer (a durability confirmation's WAIT).
    """
    options = pool_options(settings, _worker if worker is None else worker)
    if wait_ms:  # a client whose calls block on the server (WAIT) that long, and more
        options["socket_timeout"] = (options["socket_timeout"] or 0) + wait_ms / 1000
    if settings.sentinels:
        return _sentinel_client(settings, options)
    return Redis(connection_pool=BlockingConnectionPool.from_url(settings.url, **options))


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The service's primary as its sentinels name it, on a blocking pool.

    SentinelConnectionPool asks the sentinels for the primary's address whenever a
    connection connects, drops its idle connections when the address changed, and
    turns a READONLY reply (a demoted primary) into a connection error; the blocking
    pool makes callers past MAX_CONNECTIONS wait for a connection, as redis_client's
    plain pool does."""


class FollowingConnection(SentinelManagedConnection):
    """A Sentinel-managed connection that asks the sentinels on every reconnect.

    redis-py reconnects a broken connection inside send_packed_command, to the last
    address it had (the dead or demoted primary); only connect() asks the sentinels,
    so this connects through it first."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect()  # type: ignore[no-untyped-call]
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


def sentinel_options(
    settings: RedisSettings, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data nodes' connection options (the URL's user, password and database with
    `options`, no host) and the sentinels' own (their password, the connect timeout)."""
    parsed: dict[str, Any] = parse_url(settings.url)  # type: ignore[no-untyped-call]
    data = {k: v for k, v in parsed.items() if k not in ("host", "port", "path")}
    data |= {k: v for k, v in options.items() if k not in ("max_connections", "timeout")}
    timeout = options["socket_connect_timeout"]
    sentinels: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if settings.sentinel_password:
        sentinels["password"] = settings.sentinel_password
    return data, sentinels


def _sentinel_client(settings: RedisSettings, options: dict[str, Any]) -> Redis:
    data, sentinel_kwargs = sentinel_options(settings, options)
    sentinel = Sentinel(list(settings.sentinels), sentinel_kwargs=sentinel_kwargs, **data)
    client: Redis = sentinel.master_for(
        settings.service,
        redis_class=Redis,
        connection_pool_class=BlockingSentinelPool,
        connection_class=FollowingConnection,
        max_connections=options["max_connections"],
        timeout=options["timeout"],
    )
    return client


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


def check_durability(client: Redis, settings: Settings) -> None:
    """Refuse a durability the server cannot give: "fsync" (for [redis] or any entity)
    needs WAITAOF (Redis 7.2 or later, or Valkey) and `appendonly yes`. Raises
    ConfigError naming the fix; BackendUnavailable when Redis cannot be asked."""
    wanting = ["redis.durability"] if settings.redis.durability == FSYNC else []
    entities = settings.entities.values()
    wanting += [f"entities.{e.name}.durability" for e in entities if e.durability == FSYNC]
    if not wanting:
        return
    try:
        info = client.info("server")
        persistence = client.info("persistence")
    except REDIS_DOWN as exc:
        raise BackendUnavailable(f"Redis at {settings.redis.shown} is unreachable: {exc}") from None
    version = str(info.get("valkey_version") or info.get("redis_version", "0"))
    server = "Valkey" if info.get("valkey_version") else "Redis"
    # WAITAOF came with Redis 7.2, which every Valkey (forked from 7.2.4) has.
    numbers = [int(n) if n.isdigit() else 0 for n in version.split(".")[:2]]
    if server == "Redis" and tuple(numbers) < (7, 2):
        raise ConfigError(
            settings.source,
            wanting[0],
            f'"fsync" needs WAITAOF, which {server} {version} at {settings.redis.shown} lacks: '
            'run Redis 7.2 or later (or Valkey), or choose durability "primary" or "replicas"',
        )
    if not persistence.get("aof_enabled"):
        raise ConfigError(
            settings.source,
            wanting[0],
            f'"fsync" needs the append-only file, which is off at {settings.redis.shown}: set '
            '"appendonly yes" in its redis.conf (CONFIG SET appendonly yes), or choose '
            'durability "primary" or "replicas"',
        )
