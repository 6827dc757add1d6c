"""What the settings are: frozen dataclasses, their defaults and what derives from them.

`Settings` holds the whole configuration; each section (Redis, the database, Celery,
monitoring) and each entity and warming job has its own dataclass. They are built
by `loading` (which checks every field as it reads it) and never changed after.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from cachewarden.durability import Durability
from cachewarden.durations import format_duration
from cachewarden.errors import UnknownEntity, UnknownJob


def masked_url(url: str) -> str:
    """`url` with its password (in the user part or a `password=` query) shown as ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class RedisSettings:
    """Where the cache and the write buffer live."""

    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "cw"
    # "refuse" (default) stops on an eviction policy that can reach the buffer;
    # "warn" logs loudly and goes on.
    unsafe_policy: str = "refuse"
    # write() raises Backpressure once Redis uses this share of maxmemory or more, so
    # what drains the buffer (locks, markers, dead letters, the broker) always fits.
    memory_headroom: float = 0.1
    # TLS (a rediss:// URL): the CA that signed the server's certificate, and this
    # client's certificate and key where the server asks for one (tls-auth-clients).
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # How long a call waits for Redis to answer, and for a connection, in an application
    # (a request path: fail within about a second) and in the worker's processes (which
    # send large batches and may wait longer).
    socket_timeout_ms: int = 1000
    connect_timeout_ms: int = 1000
    worker_socket_timeout_ms: int = 30_000
    worker_connect_timeout_ms: int = 5_000
    # Redis Sentinel: the sentinels' (host, port) and the service (master) name; empty:
    # `url` names the server itself. With sentinels, `url` still gives the database
    # number, user and password of the data nodes (its host is not used);
    # `sentinel_password` is the sentinels' own (requirepass in sentinel.conf).
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    sentinel_password: str = ""
    # When write() and delete() return (durability.py): "primary", "fsync" or
    # "replicas"; `replicas` is how many replicas "replicas" waits for, and how many
    # coordination state (locks, fencing tokens, due-time claims, run numbers) waits
    # for whatever the durability (0: none); both wait up to durability_timeout_ms.
    durability: str = "primary"
    replicas: int = 0
    durability_timeout_ms: int = 1_000

    def timeouts_s(self, worker: bool) -> tuple[float, float]:
        """(socket, connect) timeouts in seconds for an application or a worker process."""
        if worker:
            return self.worker_socket_timeout_ms / 1000, self.worker_connect_timeout_ms / 1000
        return self.socket_timeout_ms / 1000, self.connect_timeout_ms / 1000

    @property
    def tls(self) -> dict[str, str]:
        """redis-py's (and kombu's) TLS options for these files (empty: none set)."""
        options = {
            "ssl_ca_certs": self.tls_ca_file,
            "ssl_certfile": self.tls_cert_file,
            "ssl_keyfile": self.tls_key_file,
        }
        return {k: v for k, v in options.items() if v}

    @property
    def shown(self) -> str:
        """Where Redis is, as any message shows it: the URL with its password masked, or
        the Sentinel service and its sentinels."""
        if self.sentinels:
            where = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"Sentinel service {self.service!r} via {where}"
        return masked_url(self.url)


@dataclass(frozen=True)
class DatabaseSettings:
    """The SQL database the write buffer drains into."""

    url: str = "sqlite:///cachewarden.db"


@dataclass(frozen=True)
class CelerySettings:
    """The task transport; the broker defaults to the configured Redis."""

    broker_url: str = ""
    concurrency: int = 0  # 0: one process per core
    queue: str = "cachewarden"
    # The Sentinel service of a sentinel:// broker_url ("": [redis] service).
    broker_service: str = ""


@dataclass(frozen=True)
class MonitoringSettings:
    """The worker's metrics and probe endpoints, and its heartbeat files."""

    port: int = 0  # 0: no HTTP endpoint (the probe command still works)
    address: str = "127.0.0.1"
    directory: str = ""  # heartbeats, prefork metrics; "": <tmp>/cachewarden-<uid>-<prefix>
    liveness_timeout_ms: int = 20_000


@dataclass(frozen=True)
class WriteBehindSettings:
    """How an entity's write buffer is flushed."""

    max_delay_ms: int = 1000
    batch_size: int = 1000
    shards: int = 4
    max_pending: int = 100_000
    # At this many dead letters the entity's writes and flushes stop until an operator
    # replays or discards them (nothing is dropped).
    max_dead_letters: int = 10_000
    lock_ttl_ms: int = 10_000
    # How long a flush statement waits for a row lock another transaction holds; the
    # locked rows then wait (pending, in order) and the rest of the batch is applied.
    lock_wait_ms: int = 1_000
    retry_base_ms: int = 500
    retry_max_ms: int = 30_000


@dataclass(frozen=True)
class EntitySettings:
    """One cached table."""

    name: str
    table: str
    # The key's columns: one (its primary key), or several for a composite key such as
    # ("tenant_id", "id"); keys are then tuples, stored as codec.key_text's encoding.
    key_columns: tuple[str, ...]
    ttl_ms: int
    version_column: str | None = None
    # How long a flushed delete at version v refuses writes and deletes at versions <= v.
    tombstone_ttl_ms: int = 86_400_000
    max_value_bytes: int = 512 * 1024
    write_behind: WriteBehindSettings = field(default_factory=WriteBehindSettings)
    # The read path (see config/reference.toml for what each one does).
    refresh_ahead: float = 0.8
    early_refresh: str = "factor"
    xfetch_beta: float = 1.0
    negative_ttl_ms: int = 60_000
    stale_ttl_ms: int = 0
    loader: str | None = None
    # This entity's own durability ("primary", "fsync", "replicas"); None: [redis]'s.
    durability: str | None = None
    lock_timeout_ms: int = 5_000
    wait_timeout_ms: int = 10_000
    refresh_batch_size: int = 1000
    sweep_interval_ms: int = 0  # 0: a quarter of the refresh window, 50 ms to 30 s
    # A read whose Redis call fails: "raise" BackendUnavailable, or load from the
    # "database" (uncached), at most redis_error_reads at once per process, waiting up
    # to redis_error_wait_ms for a turn.
    on_redis_error: str = "raise"
    redis_error_reads: int = 8
    redis_error_wait_ms: int = 1_000

    @property
    def composite(self) -> bool:
        """True when the key has more than one column."""
        return len(self.key_columns) > 1

    @property
    def key_label(self) -> str:
        """The key's column names for messages and SQL: "id", or "tenant_id, id"."""
        return ", ".join(self.key_columns)

    @property
    def refresh_window_ms(self) -> int:
        """How long before expiry an entry is due for refresh (0: refresh-ahead is off)."""
        return round(self.ttl_ms * (1 - self.refresh_ahead)) if self.refresh_ahead > 0 else 0

    @property
    def sweep_period_ms(self) -> int:
        """How often the hot-key sweep runs for this entity."""
        if self.sweep_interval_ms:
            return self.sweep_interval_ms
        return min(30_000, max(50, self.refresh_window_ms // 4))


@dataclass(frozen=True)
class WarmingJob:
    """One scheduled warming job: a query whose rows fill an entity's cache entries."""

    name: str
    entity: str
    query: str | None  # None: every row of the entity's table
    cron: str | None  # five fields, in `timezone`; or else...
    every_ms: int | None  # ...a fixed interval, anchored at the Unix epoch
    timezone: str = "UTC"
    chunk_size: int = 5000
    ttl_ms: int | None = None  # None: the entity's
    ttl_jitter: float = 0.1  # each entry's TTL is drawn from the last share of it
    timeout_ms: int = 3_600_000
    enabled: bool = True
    misfire_grace_ms: int | None = None  # None: one interval, at most 1 h

    @property
    def schedule(self) -> str:
        """The schedule as the config wrote it: `cron "..." (TZ)` or `every N`."""
        if self.cron is not None:
            return f"cron {self.cron!r} ({self.timezone})"
        return f"every {format_duration(self.every_ms or 0)}"


@dataclass(frozen=True)
class Settings:
    """Everything cachewarden reads from its configuration."""

    source: str
    redis: RedisSettings
    database: DatabaseSettings
    celery: CelerySettings
    entities: Mapping[str, EntitySettings]
    warming: Mapping[str, WarmingJob] = field(default_factory=dict)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    dispatch_interval_ms: int = 100
    # A flush task queued this long and not started is taken as lost and sent again.
    requeue_after_ms: int = 120_000

    def queue(self, family: str) -> str:
        """The Celery queue of one job family's tasks: `<[celery] queue>.<family>`."""
        return f"{self.celery.queue}.{family}"

    @property
    def broker_url(self) -> str:
        """The Celery broker: `[celery] broker_url`, or else the cache's Redis (through
        its sentinels, as kombu's sentinel:// URLs, when it has them)."""
        if self.celery.broker_url:
            return self.celery.broker_url
        redis = self.redis
        if not redis.sentinels:
            return redis.url
        parts = urlsplit(redis.url)
        auth = parts.netloc.rpartition("@")[0]
        auth = f"{auth}@" if auth else ""
        db = parts.path.strip("/") or "0"
        return ";".join(f"sentinel://{auth}{host}:{port}/{db}" for host, port in redis.sentinels)

    @property
    def broker_service(self) -> str:
        """The Sentinel service a sentinel:// broker asks for."""
        return self.celery.broker_service or self.redis.service

    def durability_of(self, spec: EntitySettings) -> Durability:
        """When a write of `spec` returns: its own durability, or else [redis]'s."""
        redis = self.redis
        mode = spec.durability or redis.durability
        return Durability(mode, redis.replicas, redis.durability_timeout_ms)

    def entity(self, name: str) -> EntitySettings:
        """The settings of entity `name`, or UnknownEntity naming the defined ones."""
        try:
            return self.entities[name]
        except KeyError:
            known = ", ".join(sorted(self.entities)) or "none"
            raise UnknownEntity(
                f"unknown entity {name!r}; {self.source} defines: {known}. "
                f"Add an [entities.{name}] table to the config."
            ) from None

    def job(self, name: str) -> WarmingJob:
        """The warming job `name`, or UnknownJob naming the defined ones."""
        try:
            return self.warming[name]
        except KeyError:
            known = ", ".join(sorted(self.warming)) or "none"
            raise UnknownJob(
                f"unknown warming job {name!r}; {self.source} defines: {known}. "
                f"Add a [warming.{name}] table to the config."
            ) from None
