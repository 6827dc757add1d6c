"""`cachewarden doctor`: each thing production needs, checked, with the fix for a failure.

Each check returns a `Finding` (pass or fail, what it saw, and on a fail how to
fix it). The checks: Redis's version, its persistence, its replication topology
(replicas, sentinels, min-replicas-to-write), whether the chosen durability can be
met and what a crash or a failover would lose with it, its eviction policy, the
write buffers' bounds against maxmemory, the broker, the database (each entity's
table, key and version column), the privilege to write each table, the shard
counts Redis records, and workers consuming each queue. Nothing here prints a
secret: URLs are shown with their passwords masked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from cachewarden.connections import check_durability
from cachewarden.database import describe, make_engine
from cachewarden.dberrors import first_line
from cachewarden.errors import CachewardenError, ConfigError
from cachewarden.keys import Keyspace
from cachewarden.settings import EntitySettings, Settings, masked_url
from cachewarden.writebehind.memory import buffer_need, memory_fit

MIN_REDIS = (7, 0)


@dataclass(frozen=True)
class Finding:
    """One check's outcome."""

    check: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _version(client: Redis) -> Finding:
    info = client.info("server")
    version = str(info.get("valkey_version") or info.get("redis_version", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    ok = parts >= MIN_REDIS
    return Finding(
        "redis version",
        ok,
        f"{'Valkey' if 'valkey_version' in info else 'Redis'} {version}",
        ""
        if ok
        else "upgrade to Redis 7.0 or later (or Valkey 7.2 or later): the "
        "scripts use function flags (allow-oom) that older servers refuse",
    )


def _persistence(client: Redis) -> Finding:
    persistence = client.info("persistence")
    if persistence.get("aof_enabled"):
        fsync = client.config_get("appendfsync").get("appendfsync", "?")
        ok = fsync in ("everysec", "always")
        return Finding(
            "persistence",
            ok,
            f"AOF on, appendfsync {fsync}",
            ""
            if ok
            else "set appendfsync everysec: with 'no' a crash loses what the "
            "kernel had not yet written, possibly many seconds of buffered writes",
        )
    saves = client.config_get("save").get("save", "")
    lost = (
        f"everything since the last RDB snapshot (save {saves!r})"
        if saves
        else "every buffered write (no AOF and no RDB snapshots)"
    )
    return Finding(
        "persistence",
        False,
        f"AOF is OFF: a Redis crash loses {lost} not yet flushed to the database",
        "set appendonly yes and appendfsync everysec (CONFIG SET appendonly yes, and in "
        "redis.conf); ops/redis/cachewarden.conf has both",
    )


def _replication(settings: Settings, client: Redis) -> Finding:
    """The topology: this server's role and replicas, and the sentinels that watch it."""
    info = client.info("replication")
    replicas = [
        f"{v['ip']}:{v['port']} ({v.get('state', '?')}, lag {v.get('lag', '?')} s)"
        for k, v in info.items()
        if k.startswith("slave") and isinstance(v, dict)
    ]
    where = f"{info.get('role', '?')} with {len(replicas)} replica(s)"
    if replicas:
        where += ": " + ", ".join(replicas)
    redis = settings.redis
    if redis.sentinels:
        where += f"; {redis.shown}"
    if info.get("role") != "master":
        return Finding(
            "replication",
            False,
            where,
            "point [redis] url at the primary, or use its sentinels ([redis] sentinels and "
            "service): a replica refuses writes (READONLY)",
        )
    limit = int(client.config_get("min-replicas-to-write").get("min-replicas-to-write", 0) or 0)
    where += f"; min-replicas-to-write {limit}"
    if redis.sentinels and limit == 0:
        return Finding(
            "replication",
            False,
            where,
            "set min-replicas-to-write 1 and min-replicas-max-lag 10 on the data nodes, so "
            "a primary cut off from its replicas stops taking writes that the promoted "
            "replica would not have",
        )
    return Finding("replication", True, where)


def _durability(settings: Settings, client: Redis) -> Finding:
    """Whether the chosen durability can be met here, and what a crash or a failover
    would lose with it, in words."""
    redis = settings.redis
    modes = {redis.durability} | {e.durability for e in settings.entities.values() if e.durability}
    info = client.info("replication")
    online = sum(
        1
        for k, v in info.items()
        if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
    )
    aof = bool(client.info("persistence").get("aof_enabled"))
    fsync = str(client.config_get("appendfsync").get("appendfsync", "?")) if aof else ""
    problems: list[str] = []
    wanted = redis.replicas
    if wanted > online:
        problems.append(
            f"[redis] replicas = {wanted} but {online} replica(s) are online: writes under "
            '"replicas" raise DurabilityUnconfirmed and locks, claims and runs wait; add '
            f"replicas or lower [redis] replicas to {online}"
        )
    if "fsync" in modes:
        try:
            check_durability(client, settings)
        except ConfigError as exc:
            problems.append(exc.problem)
    crash = (
        "nothing (appendfsync always)"
        if fsync == "always"
        else "up to 1 s of acknowledged writes (appendfsync everysec)"
        if fsync == "everysec"
        else "every write not yet flushed (AOF off)"
        if not aof
        else f"whatever the kernel had not written (appendfsync {fsync})"
    )
    losses = []
    for mode in sorted(modes):
        if mode == "replicas":
            lost = f"nothing acknowledged while {wanted} replica(s) confirm (else the write raises)"
            losses.append(f'"replicas": a host crash or a failover loses {lost}')
        elif mode == "fsync":
            losses.append(
                '"fsync": a host crash loses nothing acknowledged; a failover loses the '
                "replication lag"
            )
        else:
            failover = "the replication lag" if online else "everything buffered (no replica)"
            losses.append(f'"primary": a host crash loses {crash}; a failover loses {failover}')
    detail = "; ".join(losses)
    if problems:
        return Finding("durability", False, detail, "; ".join(problems))
    return Finding("durability", True, detail)


def _eviction(client: Redis) -> Finding:
    policy = str(client.config_get("maxmemory-policy").get("maxmemory-policy", ""))
    ok = not policy.startswith("allkeys-")
    return Finding(
        "maxmemory-policy",
        ok,
        policy,
        ""
        if ok
        else f"{policy} can evict the write buffer (its streams carry no TTL): "
        "set maxmemory-policy noeviction (or a volatile-* policy, which only evicts "
        "cache entries)",
    )


def _memory(settings: Settings, client: Redis, keys: Keyspace) -> Finding:
    warnings = memory_fit(settings, client, keys)
    limit = int(client.info("memory").get("maxmemory", 0))
    detail = f"maxmemory {limit / 1048576:,.0f} MB" if limit else "no maxmemory"
    if not warnings:
        return Finding("buffer bounds", True, f"{detail}: the write buffers fit")
    # The maxmemory at which the full buffers fit below the write headroom.
    need, _ = buffer_need(settings, client, keys)
    enough = f"{need / (1 - settings.redis.memory_headroom) / 1048576:,.0f} MB"
    if not limit:
        fix = (
            "set maxmemory to what the host can give Redis (CONFIG SET maxmemory, and in "
            f"redis.conf), at least {enough} for the full write buffers, with "
            "maxmemory-policy noeviction: a full Redis then refuses writes with "
            "Backpressure instead of the host running out of memory"
        )
    else:
        fix = (
            f"raise maxmemory to at least {enough} (CONFIG SET maxmemory, and in "
            "redis.conf), or lower write_behind.max_pending or write_behind.shards of "
            f"{', '.join(settings.entities)} until max_pending x shards fits"
        )
    return Finding("buffer bounds", False, warnings[0], fix)


def _shards(settings: Settings, client: Redis) -> Finding:
    """Fails where an entity's configured shard count is not the one Redis records (or a
    reshard drains): processes follow the record and only warn (`check_shards`), so a
    config left behind would go unnoticed, and it seeds the record of a new prefix."""
    from cachewarden.context import Context
    from cachewarden.writebehind.shardcount import check_shards, recorded

    context = Context(settings, client)
    try:
        warnings = check_shards(context)
    finally:
        context.lua.close()
    if not warnings:
        return Finding("shard counts", True, "each entity's matches the count Redis records")
    fixes = []
    for spec in settings.entities.values():
        ours, record = spec.write_behind.shards, recorded(client, context.keys, spec.name)
        field = f"entities.{spec.name}.write_behind.shards"
        if record is None or record == str(ours):
            continue
        if ">" in record:
            new = record.split(">", 1)[1]
            fixes.append(
                f"a reshard of {spec.name} to {new} shards drains: let it finish (run "
                f"`cachewarden reshard {spec.name} {new}` again if it stopped), then set "
                f"{field} = {new}"
            )
        else:
            fixes.append(
                f"set {field} = {record} (the count Redis records), or run "
                f"`cachewarden reshard {spec.name} {ours}` to move the buffer to {ours} shards"
            )
    return Finding(
        "shard counts",
        False,
        "; ".join(warnings),
        "; ".join(fixes)
        or "set write_behind.shards to the count Redis records, or run "
        "`cachewarden reshard ENTITY N`",
    )


def _broker(settings: Settings) -> Finding:
    from cachewarden.celeryconf import task_client

    app = task_client(settings)
    shown = masked_url(settings.broker_url)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        return Finding(
            "broker",
            False,
            f"{shown}: {type(exc).__name__}: {str(exc).replace(settings.broker_url, shown)}",
            "start the broker or fix [celery] broker_url ($CACHEWARDEN_BROKER_URL)",
        )
    return Finding("broker", True, shown)


def _tables(settings: Settings, engine: Engine) -> list[Finding]:
    from cachewarden.tables import reflect_table

    found = []
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return [
            Finding(
                "database",
                False,
                f"{describe(engine)}: {first_line(exc)}",
                "start the database or fix [database] url ($CACHEWARDEN_DATABASE_URL)",
            )
        ]
    found.append(Finding("database", True, f"{describe(engine)} ({engine.dialect.name})"))
    for spec in settings.entities.values():
        try:
            table = reflect_table(engine, spec, settings.source)
        except CachewardenError as exc:
            found.append(Finding(f"table {spec.table}", False, str(exc), _table_fix(spec, exc)))
            continue
        columns = f"key {spec.key_label}" + (
            f", version {spec.version_column}" if spec.version_column else ""
        )
        found.append(Finding(f"table {spec.table}", True, columns))
        found.append(_writable(engine, spec.table, table.table, table.key_column))
    return found


def _table_fix(spec: EntitySettings, exc: CachewardenError) -> str:
    """The fix of an entity's table that failed reflection, for what the error names."""
    if not isinstance(exc, ConfigError):
        return "start the database or fix [database] url ($CACHEWARDEN_DATABASE_URL)"
    if exc.field.endswith(".table"):
        return f"create table {spec.table} in the database, or set {exc.field} to one that exists"
    if "primary key" in exc.problem:
        return (
            f"ALTER TABLE {spec.table} ADD PRIMARY KEY ({spec.key_label}) (or ADD UNIQUE "
            f"({spec.key_label})), or set {exc.field} to the columns that have one"
        )
    return f"set {exc.field} to one of the table's columns, or add the column to {spec.table}"


def _writable(engine: Engine, name: str, table: Any, key: Any) -> Finding:
    """INSERT, UPDATE and DELETE of no row, rolled back: the database checks the grants."""
    try:
        with engine.connect() as conn, conn.begin() as tx:
            conn.execute(
                table.insert().from_select(
                    [key], table.select().with_only_columns(key).where(text("1 = 0"))
                )
            )
            conn.execute(table.update().where(text("1 = 0")).values({key.name: key}))
            conn.execute(table.delete().where(text("1 = 0")))
            tx.rollback()
    except SQLAlchemyError as exc:
        return Finding(
            f"write {name}",
            False,
            first_line(exc),
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {name} to the user of [database] url",
        )
    return Finding(f"write {name}", True, "INSERT, UPDATE and DELETE allowed")


def _workers(settings: Settings) -> Finding:
    from cachewarden.celeryconf import FAMILIES, task_client

    wanted = [settings.queue(f) for f in FAMILIES]
    try:
        replies = task_client(settings).control.inspect(timeout=1.5).active_queues() or {}
    except Exception as exc:
        return Finding(
            "workers",
            False,
            f"could not ask them: {exc}",
            f"start the broker at {masked_url(settings.broker_url)}, or fix [celery] "
            "broker_url ($CACHEWARDEN_BROKER_URL)",
        )
    consumed: dict[str, list[str]] = {q: [] for q in wanted}
    for worker, queues in replies.items():
        for queue in queues:
            if queue.get("name") in consumed:
                consumed[queue["name"]].append(worker)
    missing = [q for q, ws in consumed.items() if not ws]
    if not replies:
        return Finding(
            "workers",
            False,
            "none answered",
            "start one: `cachewarden worker` (or celery -A worker worker)",
        )
    detail = ", ".join(f"{q}: {len(ws)}" for q, ws in consumed.items())
    if missing:
        return Finding(
            "workers",
            False,
            f"no worker consumes {', '.join(missing)} ({detail})",
            "start a worker for them: celery -A worker worker -Q " + ",".join(missing),
        )
    return Finding("workers", True, f"{len(replies)} online; consumers per queue: {detail}")


def run_checks(settings: Settings, client: Redis) -> list[Finding]:
    """Every check, in order; a check that cannot run is a failure saying why."""
    keys = Keyspace(settings.redis.prefix)
    findings: list[Finding] = []
    redis_checks: list[tuple[str, Callable[[], Finding]]] = [
        ("redis version", lambda: _version(client)),
        ("persistence", lambda: _persistence(client)),
        ("replication", lambda: _replication(settings, client)),
        ("durability", lambda: _durability(settings, client)),
        ("maxmemory-policy", lambda: _eviction(client)),
        ("buffer bounds", lambda: _memory(settings, client, keys)),
        ("shard counts", lambda: _shards(settings, client)),
    ]
    for name, check in redis_checks:
        try:
            findings.append(check())
        except RedisError as exc:
            findings.append(
                Finding(
                    name,
                    False,
                    f"Redis at {settings.redis.shown}: {exc}",
                    f"start Redis at {settings.redis.shown}, or fix [redis] url "
                    "($CACHEWARDEN_REDIS_URL)",
                )
            )
    findings.append(_broker(settings))
    engine = make_engine(settings.database)
    try:
        findings += _tables(settings, engine)
    finally:
        engine.dispose()
    findings.append(_workers(settings))
    return findings
