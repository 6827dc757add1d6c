"""Reading the settings: the config file's path, its TOML and the environment's overrides.

`load_settings()` finds the file (`--config`, `$CACHEWARDEN_CONFIG`, or
config/cachewarden.toml), and `parse_settings` validates each field as it reads it
into the model's frozen dataclasses, the environment's URLs over the file's. Every
validation failure raises `ConfigError(file, field, problem)`, which the command
line prints as one line; an unknown key is named with the valid one it is closest
to (a misspelt setting), since that is the likely cause of what failed.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cachewarden.durability import MODES, REPLICAS
from cachewarden.durations import parse_duration_ms
from cachewarden.errors import ConfigError
from cachewarden.runtime import default_dir
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

DEFAULT_CONFIG_PATH = "config/cachewarden.toml"
CONFIG_ENV = "CACHEWARDEN_CONFIG"
REDIS_URL_ENV = "CACHEWARDEN_REDIS_URL"
DATABASE_URL_ENV = "CACHEWARDEN_DATABASE_URL"
BROKER_URL_ENV = "CACHEWARDEN_BROKER_URL"
SENTINEL_PASSWORD_ENV = "CACHEWARDEN_SENTINEL_PASSWORD"

_REFERENCE = "see config/reference.toml for the valid ones"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class _Reader:
    """Pulls typed fields out of one TOML table, naming the field on error."""

    def __init__(self, source: str, path: str, table: Mapping[str, Any]) -> None:
        self.source = source
        self.path = path
        self.table = table
        self.seen: set[str] = set()

    def fail(self, key: str, problem: str) -> ConfigError:
        """The error for `key`; a misspelt key of this table comes first, since it is the
        likely cause ("ttl is required" when the file says `tll`). Only keys asked for and
        absent are taken as misspelt ones: keys not asked for yet may be valid."""
        absent = {k for k in self.seen | {key} if k and k not in self.table}
        typo = self._typo(absent, self.seen | {key})
        if typo is not None:
            return typo
        return self._error(key, problem)

    def _error(self, key: str, problem: str) -> ConfigError:
        where = ".".join(part for part in (self.path, key) if part)
        return ConfigError(self.source, where, problem)

    def _typo(self, valid: set[str], known: set[str]) -> ConfigError | None:
        """A key of this table not in `known` that is close to one of `valid`, named with it."""
        for unknown in sorted(set(self.table) - known):
            close = difflib.get_close_matches(unknown, sorted(valid - {""}), n=1)
            if close:
                return self._error(
                    unknown, f"unknown setting; did you mean {close[0]!r}? ({_REFERENCE})"
                )
        return None

    def get(self, key: str, kind: type, default: Any) -> Any:
        self.seen.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.fail(key, f"expected a whole number, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise self.fail(key, f"expected a number, got {value!r}")
        if kind is bool and not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        if kind is list and not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {value!r}")
        return value

    def positive(self, key: str, default: int) -> int:
        value: int = self.get(key, int, default)
        if value < 1:
            raise self.fail(key, f"must be at least 1, got {value}")
        return value

    def duration(self, key: str, default_ms: int | None) -> int | None:
        self.seen.add(key)
        if key not in self.table:
            return default_ms
        try:
            return parse_duration_ms(self.table[key])
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def required_duration(self, key: str, default_ms: int | None = None) -> int:
        value = self.duration(key, default_ms)
        if value is None:
            raise self.fail(key, 'is required (a duration such as "10m")')
        if value <= 0:
            raise self.fail(key, "must be longer than zero")
        return value

    def sub(self, key: str) -> _Reader:
        self.seen.add(key)
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, "expected a table")
        return _Reader(self.source, f"{self.path}.{key}" if self.path else key, value)

    def reject_unknown(self) -> None:
        """Raise for a key of this table that no getter asked for (naming the closest
        valid one where there is one)."""
        typo = self._typo(self.seen, self.seen)
        if typo is not None:
            raise typo
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise self._error(unknown[0], f"unknown setting; {_REFERENCE}")


def _env_or(reader: _Reader, key: str, env: str, default: str) -> str:
    """The environment variable `env` if set, else the file's `key`.

    The file's value is read (type-checked, and counted as a known setting) either way.
    """
    file_value: str = reader.get(key, str, default)
    return os.environ.get(env) or file_value


def _redis(reader: _Reader) -> RedisSettings:
    url = _env_or(reader, "url", REDIS_URL_ENV, RedisSettings.url)
    url, sentinel = _sentinel(reader, url)
    prefix = reader.get("prefix", str, "cw")
    if not _PREFIX.match(prefix):
        raise reader.fail("prefix", "use 1-32 letters, digits, '_', '-' or '.'")
    policy = reader.get("unsafe_policy", str, "refuse")
    if policy not in ("refuse", "warn"):
        raise reader.fail("unsafe_policy", 'must be "refuse" or "warn"')
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise reader.fail(
            "url", f"{url!r} is not a redis://, rediss://, unix:// or redis+sentinel:// URL"
        )
    headroom = float(reader.get("memory_headroom", float, 0.1))
    if not 0 <= headroom < 0.9:
        raise reader.fail("memory_headroom", f"must be at least 0 and below 0.9, got {headroom}")
    tls = {
        name: reader.get(name, str, "") for name in ("tls_ca_file", "tls_cert_file", "tls_key_file")
    }
    for name, path in tls.items():
        if path and not os.path.isfile(path):
            raise reader.fail(name, f"{path!r} is not a file")
    if bool(tls["tls_cert_file"]) != bool(tls["tls_key_file"]):
        raise reader.fail("tls_cert_file", "set both tls_cert_file and tls_key_file, or neither")
    if any(tls.values()) and not url.startswith("rediss://"):
        raise reader.fail("url", "TLS files are set: use a rediss:// URL")
    defaults = RedisSettings()
    timeouts: dict[str, int] = {}
    for name in (
        "socket_timeout",
        "connect_timeout",
        "worker_socket_timeout",
        "worker_connect_timeout",
    ):
        ms = reader.duration(name, getattr(defaults, f"{name}_ms"))
        if ms is None or ms <= 0:
            raise reader.fail(name, 'must be a positive duration, e.g. "1s" or "500ms"')
        timeouts[f"{name}_ms"] = ms
    durability = _durability_settings(reader)
    reader.reject_unknown()
    return RedisSettings(
        **sentinel,
        **durability,
        url=url,
        prefix=prefix,
        unsafe_policy=policy,
        memory_headroom=headroom,
        tls_ca_file=tls["tls_ca_file"],
        tls_cert_file=tls["tls_cert_file"],
        tls_key_file=tls["tls_key_file"],
        socket_timeout_ms=timeouts["socket_timeout_ms"],
        connect_timeout_ms=timeouts["connect_timeout_ms"],
        worker_socket_timeout_ms=timeouts["worker_socket_timeout_ms"],
        worker_connect_timeout_ms=timeouts["worker_connect_timeout_ms"],
    )


def _sentinel(reader: _Reader, url: str) -> tuple[str, dict[str, Any]]:
    """The data nodes' URL and the Sentinel fields, from `sentinels` and `service`, or
    from a redis+sentinel://[user:password@]host:port,host:port/service[/db] URL (its
    password is the data nodes'; `sentinel_password` the sentinels')."""
    sentinels = reader.get("sentinels", list, None)
    service = reader.get("service", str, "")
    password = _env_or(reader, "sentinel_password", SENTINEL_PASSWORD_ENV, "")
    if url.startswith("redis+sentinel://"):
        if sentinels is not None:
            raise reader.fail("sentinels", "set sentinels or a redis+sentinel:// url, not both")
        parts = urlsplit(url)
        hosts = parts.netloc.rpartition("@")[2]
        path = [p for p in parts.path.split("/") if p]
        if not hosts or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise reader.fail(
                "url",
                f"{masked_url(url)!r}: a Sentinel URL is "
                "redis+sentinel://[:password@]host:port,host:port/service[/db]",
            )
        sentinels, service = hosts.split(","), path[0]
        user = parts.netloc.rpartition("@")[0]
        url = f"redis://{user + '@' if user else ''}sentinel/{path[1] if len(path) == 2 else 0}"
    if sentinels is None:
        if service:
            raise reader.fail("service", "is set but sentinels is not: name the sentinels")
        return url, {}
    found: list[tuple[str, int]] = []
    for entry in sentinels:
        host, _, port = str(entry).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise reader.fail("sentinels", f'{entry!r} is not host:port (e.g. "10.0.0.5:26379")')
        found.append((host.strip("[]"), int(port)))
    if not found:
        raise reader.fail("sentinels", "is empty: name at least one sentinel (three in production)")
    if not service:
        raise reader.fail("service", "is required with sentinels: the name they monitor")
    return url, {"sentinels": tuple(found), "service": service, "sentinel_password": password}


def _durability_settings(reader: _Reader) -> dict[str, Any]:
    durability = reader.get("durability", str, "primary")
    if durability not in MODES:
        raise reader.fail("durability", f"must be one of {', '.join(map(repr, MODES))}")
    default = 1 if durability == REPLICAS else 0
    replicas = reader.get("replicas", int, default)
    if replicas < 0 or (durability == REPLICAS and replicas < 1):
        least = 1 if durability == REPLICAS else 0
        raise reader.fail("replicas", f"must be at least {least} here, got {replicas}")
    timeout = reader.duration("durability_timeout", RedisSettings.durability_timeout_ms)
    if timeout is None or timeout <= 0:
        raise reader.fail("durability_timeout", 'must be a positive duration, e.g. "1s"')
    return {"durability": durability, "replicas": replicas, "durability_timeout_ms": timeout}


def _write_behind(reader: _Reader) -> WriteBehindSettings:
    defaults = WriteBehindSettings()
    settings = WriteBehindSettings(
        max_delay_ms=reader.required_duration("max_delay", defaults.max_delay_ms),
        batch_size=reader.positive("batch_size", defaults.batch_size),
        shards=reader.positive("shards", defaults.shards),
        max_pending=reader.positive("max_pending", defaults.max_pending),
        max_dead_letters=reader.positive("max_dead_letters", defaults.max_dead_letters),
        lock_ttl_ms=reader.required_duration("lock_ttl", defaults.lock_ttl_ms),
        lock_wait_ms=reader.required_duration("lock_wait", defaults.lock_wait_ms),
        retry_base_ms=reader.required_duration("retry_base", defaults.retry_base_ms),
        retry_max_ms=reader.required_duration("retry_max", defaults.retry_max_ms),
    )
    if settings.shards > 1024:
        raise reader.fail("shards", "at most 1024")
    if settings.max_pending < settings.batch_size:
        raise reader.fail("max_pending", "must be at least batch_size")
    reader.reject_unknown()
    return settings


def _entity(name: str, reader: _Reader, redis: RedisSettings) -> EntitySettings:
    if not _NAME.match(name):
        raise reader.fail("", "entity names use letters, digits and '_' (at most 63)")
    table = reader.get("table", str, None)
    if table is None:
        raise reader.fail("table", "is required: the database table this entity caches")
    key_columns = _key_columns(reader)
    ttl_ms = reader.required_duration("ttl")
    durability = reader.get("durability", str, None)
    if durability is not None and durability not in MODES:
        raise reader.fail("durability", f"must be one of {', '.join(map(repr, MODES))}")
    if durability == REPLICAS and redis.replicas < 1:
        raise reader.fail("durability", '"replicas" needs [redis] replicas = 1 or more')
    entity = EntitySettings(
        name=name,
        table=table,
        key_columns=key_columns,
        ttl_ms=ttl_ms,
        durability=durability,
        version_column=reader.get("version_column", str, None),
        tombstone_ttl_ms=reader.required_duration("tombstone_ttl", 86_400_000),
        max_value_bytes=reader.positive("max_value_bytes", 512 * 1024),
        write_behind=_write_behind(reader.sub("write_behind")),
        **_read_path(reader, ttl_ms, key_columns),
    )
    reader.reject_unknown()
    return entity


def _key_columns(reader: _Reader) -> tuple[str, ...]:
    """`key`: one column name, or a list of them (a composite key)."""
    reader.seen.add("key")
    key = reader.table.get("key")
    if key is None:
        raise reader.fail(
            "key",
            'is required: the table\'s primary-key column ("id"), or its columns '
            '(["tenant_id", "id"])',
        )
    columns = [key] if isinstance(key, str) else key
    if (
        not isinstance(columns, list)
        or not columns
        or not all(isinstance(c, str) and c for c in columns)
    ):
        raise reader.fail(
            "key",
            f'expected a column name or a list of them, such as ["tenant_id", "id"]; got {key!r}',
        )
    if len(set(columns)) != len(columns):
        raise reader.fail("key", f"names a column twice: {key!r}")
    return tuple(columns)


def _read_path(reader: _Reader, ttl_ms: int, key_columns: tuple[str, ...]) -> dict[str, Any]:
    """The read-path fields of an entity (refresh-ahead, negative and stale caching, loads)."""
    factor = float(reader.get("refresh_ahead", float, 0.8))
    if not 0 <= factor < 1:
        raise reader.fail("refresh_ahead", f"must be at least 0 (off) and below 1, got {factor}")
    early = reader.get("early_refresh", str, "factor")
    if early not in ("factor", "xfetch"):
        raise reader.fail("early_refresh", 'must be "factor" or "xfetch"')
    beta = float(reader.get("xfetch_beta", float, 1.0))
    if beta <= 0:
        raise reader.fail("xfetch_beta", f"must be above 0, got {beta}")
    loader = reader.get("loader", str, None)
    if loader is not None:
        # One key column: the parameter :key. Several: one parameter per key column,
        # named after it (:tenant_id, :id).
        names = ("key",) if len(key_columns) == 1 else key_columns
        missing = [n for n in names if not re.search(rf"(?<!:):{re.escape(n)}\b", loader)]
        if missing:
            wanted = ", ".join(f":{n}" for n in names)
            noun = "parameter" if len(names) == 1 else "parameters"
            raise reader.fail("loader", f"the SQL must take the key as the {noun} {wanted}")
    stale = reader.duration("stale_ttl", 0)
    on_redis_error = reader.get("on_redis_error", str, "raise")
    if on_redis_error not in ("raise", "database"):
        raise reader.fail("on_redis_error", 'must be "raise" or "database"')
    return {
        "on_redis_error": on_redis_error,
        "redis_error_reads": reader.positive("redis_error_reads", 8),
        "redis_error_wait_ms": reader.required_duration("redis_error_wait", 1_000),
        "refresh_ahead": factor,
        "early_refresh": early,
        "xfetch_beta": beta,
        "negative_ttl_ms": reader.required_duration("negative_ttl", min(ttl_ms, 60_000)),
        "stale_ttl_ms": stale or 0,
        "loader": loader,
        "lock_timeout_ms": reader.required_duration("lock_timeout", 5_000),
        "wait_timeout_ms": reader.required_duration("wait_timeout", 10_000),
        "refresh_batch_size": reader.positive("refresh_batch_size", 1000),
        "sweep_interval_ms": reader.duration("sweep_interval", 0) or 0,
    }


_TLS_FILES = ("tls_ca_file", "tls_cert_file", "tls_key_file")
_CRON_FIELD = re.compile(r"^[A-Za-z0-9*?/,-]+$")
_HOUR_MS = 3_600_000


def _share(reader: _Reader, key: str, default: float) -> float:
    """A share written "10%" or 0.1."""
    reader.seen.add(key)
    value = reader.table.get(key, default)
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise reader.fail(key, f'{value!r} is not a share; write "10%" or 0.1') from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise reader.fail(key, f'must be a share from "0%" to "100%" (or 0 to 1), got {value!r}')
    return float(value)


def _schedule(reader: _Reader) -> dict[str, Any]:
    """A job's cron or every (exactly one), its time zone and its misfire grace."""
    cron = reader.get("cron", str, None)
    every = reader.duration("every", None)
    if (cron is None) == (every is None):
        raise reader.fail(
            "cron" if cron is not None else "every",
            'set exactly one of cron (five fields, e.g. "*/5 * * * *") or every (e.g. "30s")',
        )
    if cron is not None:
        fields = cron.split()
        if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise reader.fail(
                "cron",
                f"{cron!r} is not a five-field cron expression "
                '(minute hour day month weekday), e.g. "*/5 * * * *"',
            )
        cron = " ".join(fields)
    if every is not None and every < 1000:
        raise reader.fail("every", f"must be at least 1s, got {every}ms")
    zone = reader.get("timezone", str, "UTC")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise reader.fail("timezone", f"{zone!r} is not an IANA time zone name") from None
    if cron is not None:
        _check_cron(reader, cron, zone)
    if cron is None and "timezone" in reader.table:
        raise reader.fail("timezone", "applies to cron only; an `every` interval has none")
    grace = reader.duration("misfire_grace", None)
    if grace is None and every is not None:
        grace = min(every, _HOUR_MS)
    return {"cron": cron, "every_ms": every, "timezone": zone, "misfire_grace_ms": grace}


def _check_cron(reader: _Reader, cron: str, zone: str) -> None:
    """Refuse a cron expression APScheduler's CronTrigger refuses (a field out of range).

    APScheduler comes with the `worker` extra and is imported here, not at import:
    an application that only reads and writes has none, and the scheduler that runs
    the job checks the expression again when it starts."""
    try:
        from apscheduler.triggers.cron import CronTrigger
    except ImportError:
        return
    try:
        CronTrigger.from_crontab(cron, timezone=ZoneInfo(zone))
    except ValueError as exc:
        raise reader.fail("cron", f"{cron!r}: {exc}") from None


def _warming_job(name: str, reader: _Reader, entities: Mapping[str, EntitySettings]) -> WarmingJob:
    if not _NAME.match(name):
        raise reader.fail("", "job names use letters, digits and '_' (at most 63)")
    entity = reader.get("entity", str, None)
    if entity is None:
        raise reader.fail("entity", "is required: the entity whose cache this job fills")
    if entity not in entities:
        known = ", ".join(sorted(entities)) or "none"
        raise reader.fail("entity", f"unknown entity {entity!r}; the config defines: {known}")
    query = reader.get("query", str, None)
    if query is not None:
        query = query.strip().rstrip(";").strip()
        if not query:
            raise reader.fail("query", "is empty; leave it out to warm every row of the table")
    job = WarmingJob(
        name=name,
        entity=entity,
        query=query,
        **_schedule(reader),
        chunk_size=reader.positive("chunk_size", 5000),
        ttl_ms=reader.duration("ttl", None),
        ttl_jitter=_share(reader, "ttl_jitter", 0.1),
        timeout_ms=reader.required_duration("timeout", 3_600_000),
        enabled=reader.get("enabled", bool, True),
    )
    if job.ttl_ms is not None and job.ttl_ms <= 0:
        raise reader.fail("ttl", "must be longer than zero")
    if job.chunk_size > 100_000:
        raise reader.fail("chunk_size", f"at most 100000, got {job.chunk_size}")
    reader.reject_unknown()
    return job


def _monitoring(reader: _Reader, prefix: str) -> MonitoringSettings:
    port = reader.get("port", int, 0)
    if not 0 <= port <= 65535:
        raise reader.fail("port", f"must be a TCP port (1-65535), or 0 for none; got {port}")
    directory = reader.get("dir", str, "") or default_dir(prefix)
    settings = MonitoringSettings(
        port=port,
        address=reader.get("address", str, "127.0.0.1"),
        directory=directory,
        liveness_timeout_ms=reader.required_duration("liveness_timeout", 20_000),
    )
    reader.reject_unknown()
    return settings


def parse_settings(data: Mapping[str, Any], source: str) -> Settings:
    """Validate a parsed TOML document and the environment into `Settings`."""
    root = _Reader(source, "", data)
    redis = _redis(root.sub("redis"))
    db = root.sub("database")
    database = DatabaseSettings(url=_env_or(db, "url", DATABASE_URL_ENV, DatabaseSettings.url))
    db.reject_unknown()
    cel = root.sub("celery")
    celery = CelerySettings(
        broker_url=_env_or(cel, "broker_url", BROKER_URL_ENV, ""),
        concurrency=cel.get("concurrency", int, 0),
        queue=cel.get("queue", str, "cachewarden"),
        broker_service=cel.get("broker_service", str, ""),
    )
    cel.reject_unknown()
    if celery.broker_url.startswith("sentinel://") and not (celery.broker_service or redis.service):
        raise cel.fail("broker_service", "is required with a sentinel:// broker_url")
    ents = root.sub("entities")
    entities = {name: _entity(name, ents.sub(name), redis) for name in ents.table}
    jobs = root.sub("warming")
    warming = {name: _warming_job(name, jobs.sub(name), entities) for name in jobs.table}
    monitoring = _monitoring(root.sub("monitoring"), redis.prefix)
    dispatch = root.sub("dispatch")
    interval = dispatch.required_duration("interval", 100)
    requeue_after = dispatch.required_duration("requeue_after", 120_000)
    dispatch.reject_unknown()
    root.reject_unknown()
    return Settings(
        source=source,
        redis=redis,
        database=database,
        celery=celery,
        entities=entities,
        warming=warming,
        monitoring=monitoring,
        dispatch_interval_ms=interval,
        requeue_after_ms=requeue_after,
    )


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file: the explicit path, `$CACHEWARDEN_CONFIG`, or the default."""
    return Path(explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read and validate the config file; raise `ConfigError` naming what is wrong."""
    file = config_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            str(file), "(file)", f"not found; pass --config or set {CONFIG_ENV}"
        ) from None
    except OSError as exc:
        raise ConfigError(str(file), "(file)", f"cannot be read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(file), "(syntax)", str(exc)) from None
    return parse_settings(data, str(file))
