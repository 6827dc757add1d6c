"""The settings: one TOML file plus environment overrides, read once.

`model` is what they are (frozen dataclasses); `loading` reads and validates the
file and the environment into them (`load_settings()`), raising `ConfigError(file,
field, problem)` on the first thing wrong. Every public name of both is here.
"""

from cachewarden.settings.loading import (
    BROKER_URL_ENV,
    CONFIG_ENV,
    DATABASE_URL_ENV,
    DEFAULT_CONFIG_PATH,
    REDIS_URL_ENV,
    config_path,
    load_settings,
    parse_settings,
)
from cachewarden.settings.model import (
    CelerySettings,
    DatabaseSettings,
    EntitySettings,
    MonitoringSettings,
    RedisSettings,
    Settings,
    WarmingJob,
    WriteBehindSettings,
    masked_url,
)

__all__ = [
    "BROKER_URL_ENV",
    "CONFIG_ENV",
    "DATABASE_URL_ENV",
    "DEFAULT_CONFIG_PATH",
    "REDIS_URL_ENV",
    "CelerySettings",
    "DatabaseSettings",
    "EntitySettings",
    "MonitoringSettings",
    "RedisSettings",
    "Settings",
    "WarmingJob",
    "WriteBehindSettings",
    "config_path",
    "load_settings",
    "masked_url",
    "parse_settings",
]
