"""cachewarden: keep a Redis cache in front of a SQL database right and fast.

from cachewarden import Cache

cache = Cache.from_config("config/cachewarden.toml")
cache.write("user", 42, {"name": "Ada", "version": 7})   # cached now, in the database soon
cache.delete("user", 42)
cache.get("user", 42)                                   # None: known absent

asyncio code uses `cachewarden.AsyncCache` (the same methods, awaited), imported on
first use so that `import cachewarden` stays light.
"""

from typing import TYPE_CHECKING, Any

from cachewarden.cache import Cache
from cachewarden.errors import (
    BackendUnavailable,
    Backpressure,
    CachewardenError,
    ConfigError,
    DurabilityUnconfirmed,
    InvalidKey,
    InvalidValue,
    LoadFailed,
    LockLost,
    Outranked,
    UnknownEntity,
    UnsafeRedis,
)
from cachewarden.settings import Settings, load_settings
from cachewarden.writebehind.enqueue import BatchResult

if TYPE_CHECKING:
    from cachewarden.aio import AsyncCache

__all__ = [
    "AsyncCache",
    "BackendUnavailable",
    "Backpressure",
    "BatchResult",
    "Cache",
    "CachewardenError",
    "ConfigError",
    "DurabilityUnconfirmed",
    "InvalidKey",
    "InvalidValue",
    "LoadFailed",
    "LockLost",
    "Outranked",
    "Settings",
    "UnknownEntity",
    "UnsafeRedis",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    """`AsyncCache`, imported on first use (redis.asyncio only for asyncio code)."""
    if name == "AsyncCache":
        from cachewarden.aio import AsyncCache

        return AsyncCache
    raise AttributeError(f"module 'cachewarden' has no attribute {name!r}")
