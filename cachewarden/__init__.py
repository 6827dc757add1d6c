"""cachewarden: keep a Redis cache in front of a SQL database right and fast.

from cachewarden import Cache

cache = Cache.from_config("config/cachewarden.toml")
cache.write("user", 42, {"name": "Ada", "version": 7})   # cached now, in the database soon
cache.delete("user", 42)
cache.get("user", 42)                                   # None: known absent
"""

from cachewarden.cache import Cache
from cachewarden.errors import (
    BackendUnavailable,
    Backpressure,
    CachewardenError,
    ConfigError,
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

__all__ = [
    "BackendUnavailable",
    "Backpressure",
    "BatchResult",
    "Cache",
    "CachewardenError",
    "ConfigError",
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
