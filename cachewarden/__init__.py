"""cachewarden: keep a Redis cache in front of a SQL database right and fast.

from cachewarden import Cache

cache = Cache.from_config("config/cachewarden.toml")
cache.write("user", 42, {"name": "Ada", "version": 7})   # cached now, in the database soon
cache.delete("user", 42)
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
    RowRejected,
    UnknownEntity,
    UnsafeRedis,
)
from cachewarden.settings import Settings, load_settings

__all__ = [
    "BackendUnavailable",
    "Backpressure",
    "Cache",
    "CachewardenError",
    "ConfigError",
    "InvalidKey",
    "InvalidValue",
    "LoadFailed",
    "LockLost",
    "RowRejected",
    "Settings",
    "UnknownEntity",
    "UnsafeRedis",
    "load_settings",
]
