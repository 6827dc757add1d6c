"""What the `cachewarden` subcommands do (the parsing is in cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from redis.exceptions import RedisError
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import SQLAlchemyError

from cachewarden.connections import check_durability, check_redis_safety, redis_client
from cachewarden.database import describe, make_engine
from cachewarden.durations import format_duration
from cachewarden.errors import BackendUnavailable, ConfigError, UnsafeRedis
from cachewarden.keys import Keyspace, due_member, parse_due_member
from cachewarden.settings import EntitySettings, Settings
from cachewarden.tables import reflect_table
from cachewarden.writebehind.deadletters import discard, list_dead, replay
from cachewarden.writebehind.shardcount import buffered_shards

OK, FAILED = 0, 1


_ms = format_duration


def _describe_entity(spec: EntitySettings) -> str:
    wb = spec.write_behind
    version = f", version_column={spec.version_column}" if spec.version_column else ""
    return (
        f"  {spec.name}: table={spec.table} key={spec.key_label} ttl={_ms(spec.ttl_ms)}{version}\n"
        f"    write_behind: max_delay={_ms(wb.max_delay_ms)} batch_size={wb.batch_size} "
        f"shards={wb.shards} max_pending={wb.max_pending} lock_ttl={_ms(wb.lock_ttl_ms)}"
    )


def check(settings: Settings, _args: argparse.Namespace) -> int:
    """Validate the config, connect to Redis and the database, print the definitions."""
    engine = make_engine(settings.database)  # ConfigError (exit 2): no driver for the URL
    print(f"config: {settings.source} (valid)")
    status = OK
    client = redis_client(settings.redis)
    try:
        client.ping()
        warnings = check_redis_safety(client, settings.redis)
        check_durability(client, settings)
        print(f"redis: {settings.redis.shown} ok (prefix {settings.redis.prefix!r})")
        for warning in warnings:
            print(f"  warning: {warning}")
    except (RedisError, BackendUnavailable, UnsafeRedis, ConfigError) as exc:
        print(f"redis: {settings.redis.shown} FAILED: {exc}")
        status = FAILED
    finally:
        client.close()
    try:
        sa_inspect(engine).get_table_names()
        print(f"database: {describe(engine)} ok ({engine.dialect.name})")
    except SQLAlchemyError as exc:
        print(f"database: {describe(engine)} FAILED: {str(exc).splitlines()[0]}")
        return FAILED
    print(f"entities ({len(settings.entities)}):")
    for spec in settings.entities.values():
        print(_describe_entity(spec))
        try:
            reflect_table(engine, spec, settings.source)
            print(f"    table {spec.table}: ok")
        except Exception as exc:
            print(f"    table {spec.table}: FAILED: {exc}")
            status = FAILED
    status = max(status, _check_warming(settings, engine))
    engine.dispose()
    return status


def _check_warming(settings: Settings, engine: Any) -> int:
    """Each warming job's schedule, and its query run for no rows."""
    if not settings.warming:
        return OK
    from cachewarden.warming.schedule import check_jobs
    from cachewarden.warming.source import WarmSource

    check_jobs(settings)  # ConfigError (exit 2) names a bad schedule
    status = OK
    print(f"warming jobs ({len(settings.warming)}):")
    for job in settings.warming.values():
        state = "" if job.enabled else " (disabled)"
        print(
            f"  {job.name}: entity={job.entity} {job.schedule} chunk_size={job.chunk_size}{state}"
        )
        try:
            spec = settings.entity(job.entity)
            WarmSource(engine, job, reflect_table(engine, spec, settings.source)).probe()
            print("    query: ok")
        except Exception as exc:
            print(f"    query: FAILED: {exc}")
            status = FAILED
    return status


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def entity_stats(settings: Settings, client: Any, keys: Keyspace) -> dict[str, Any]:
    """Pending writes per shard, due shards and dead letters, per entity; entities with
    buffered writes that the config no longer defines are listed too ("configured": false).

    A configured entity's shards are those of the count Redis records, not the config's
    (both counts' during a reshard "N>M": `shardcount.buffered_shards`), so writes on
    shard numbers the config lacks are counted."""
    specs = list(settings.entities.values())
    with client.pipeline(transaction=False) as pipe:
        pipe.zrange(keys.due(), 0, -1, withscores=True)
        for spec in specs:
            pipe.get(keys.shard_count(spec.name))
        found, *records = pipe.execute()
    due = dict(found)
    shards_of: dict[str, range | list[int]] = {
        spec.name: range(buffered_shards(record, spec.write_behind.shards))
        for spec, record in zip(specs, records, strict=True)
    }
    for member in due:
        entity, shard = parse_due_member(member)
        if entity not in settings.entities:
            shards_of.setdefault(entity, [])
            cast("list[int]", shards_of[entity]).append(shard)
    out: dict[str, Any] = {}
    for name, shards in shards_of.items():
        with client.pipeline(transaction=False) as pipe:
            for s in shards:
                pipe.xlen(keys.stream(name, s))
            pipe.xlen(keys.dead(name))
            pipe.hgetall(keys.read_stats(name))
            *pending, dead, reads = pipe.execute()
        out[name] = {
            "configured": name in settings.entities,
            "pending": sum(pending),
            "pending_per_shard": [int(n) for n in pending],
            "due_shards": [s for s in shards if due_member(name, s) in due],
            "dead_letters": int(dead),
            "read": {k: _number(v) for k, v in reads.items()},
        }
    return out


@contextmanager
def _redis(settings: Settings) -> Iterator[Any]:
    """A client for the command's work: a Redis error is BackendUnavailable naming the
    server (password masked), and the client is closed either way."""
    client = redis_client(settings.redis)
    try:
        yield client
    except RedisError as exc:
        raise BackendUnavailable(f"Redis at {settings.redis.shown}: {exc}") from None
    finally:
        client.close()


def stats(settings: Settings, args: argparse.Namespace) -> int:
    """Print pending writes, due shards, dead letters and read-path counters."""
    with _redis(settings) as client:
        data = entity_stats(settings, client, Keyspace(settings.redis.prefix))
    if args.json:
        print(json.dumps(data))
        return OK
    for name, row in data.items():
        reads = " ".join(f"{k}={v}" for k, v in sorted(row["read"].items())) or "none yet"
        if not row["configured"]:
            name += " (NOT IN THE CONFIG: its buffered writes wait; add it back to flush them)"
        print(
            f"{name}: pending={row['pending']} {row['pending_per_shard']} "
            f"due_shards={row['due_shards']} dead_letters={row['dead_letters']} "
            f"read: {reads}"
        )
    return OK


def probe(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when the workers here are live (or ready), 1 with the reason when not."""
    from cachewarden.operator import heartbeat

    directory = settings.monitoring.directory
    names = [args.node] if args.node else heartbeat.nodes(directory)
    if not names:
        print(f"probe: no worker heartbeat in {directory}", file=sys.stderr)
        return FAILED
    timeout_s = settings.monitoring.liveness_timeout_ms / 1000
    failed = 0
    for node in names:
        state = heartbeat.health(directory, node)
        ok = state.live(timeout_s) if args.kind == "live" else state.ready
        ages = ", ".join(
            f"{k} {'never' if a is None else f'{a:.1f}s ago'}" for k, a in state.ages_s.items()
        )
        print(f"{'ok' if ok else 'FAIL'} {args.kind} {node}: {ages}; queues: {state.queues}")
        failed += not ok
    return FAILED if failed else OK


def status_data(settings: Settings, client: Any) -> dict[str, Any]:
    """What `status` shows, as data."""
    from cachewarden.operator.observe import entity_state, redis_now_ms, seen_workers

    now = redis_now_ms(client)
    entities = {
        name: {
            "pending": state.pending,
            "lag_s": round(state.lag_s, 3),
            "dead_letters": state.dead_letters,
            "writes_enqueued": state.enqueued,
            "reads": state.reads,
            "last_flush_ms": state.last_flush_ms,
            "last_sweep_ms": state.last_sweep_ms,
        }
        for name, state in entity_state(settings, client).items()
    }
    jobs: list[dict[str, Any]] = []
    if settings.warming:
        from cachewarden.context import Context
        from cachewarden.operator.warm import job_rows

        context = Context(settings, client)
        try:
            jobs = job_rows(settings, context)
        finally:
            context.lua.close()
    workers = {
        node: round((now - at) / 1000, 1) for node, at in seen_workers(settings, client).items()
    }
    return {"entities": entities, "jobs": jobs, "workers_seen_s_ago": workers}


def status(settings: Settings, args: argparse.Namespace) -> int:
    """Pending writes and lag, dead letters, reads, last flush and sweep; jobs; workers."""
    with _redis(settings) as client:
        data = status_data(settings, client)
    if args.json:
        print(json.dumps(data))
        return OK
    print(f"redis: {settings.redis.shown}")
    for name, e in data["entities"].items():
        reads = e["reads"]
        print(
            f"entity {name}: pending={e['pending']:,} lag={e['lag_s']:.1f}s "
            f"dead_letters={e['dead_letters']:,} enqueued={e['writes_enqueued']:,} "
            f"hits={int(reads.get('hits', 0)):,} misses={int(reads.get('misses', 0)):,} "
            f"loads={int(reads.get('loads', 0)):,} waits={int(reads.get('waits', 0)):,} "
            f"refreshed={int(reads.get('refreshed', 0)):,} "
            f"last_flush={_ago(e['last_flush_ms'])} last_sweep={_ago(e['last_sweep_ms'])}"
        )
    for job in data["jobs"]:
        run = job["run"] or {}
        print(
            f"job {job['job']}: {job['schedule']} last={_ago(run.get('started_ms'))} "
            f"({job['outcome'] or 'never run'}) next={_ago(job['next_ms'])}"
        )
    workers = data["workers_seen_s_ago"]
    print(f"workers seen in the last minute: {len(workers)}")
    for node, ago in sorted(workers.items()):
        print(f"  {node}: {ago:.0f}s ago")
    return OK


def _ago(ms: int | None) -> str:
    import time

    if not ms:
        return "-"
    delta = time.time() - ms / 1000
    return f"{delta:.0f}s ago" if delta >= 0 else f"in {-delta:.0f}s"


def dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    """list / show / replay / drop (discard) dead letters of one entity."""
    from cachewarden.cache import Cache

    cache = Cache(settings, reflect=False)
    spec = cache.entity(args.entity)
    try:
        letters = list_dead(cache.redis, cache.keys, spec.name, count=args.count)
        if args.ids:
            letters = [letter for letter in letters if letter.id in set(args.ids)]
        if args.action == "show":
            for letter in letters:
                print(json.dumps(letter.as_dict(), indent=2))
            if not letters:
                print(f"no dead letter {', '.join(args.ids)} in {spec.name}", file=sys.stderr)
                return FAILED
        elif args.action == "list":
            for letter in letters:
                if args.json:
                    print(json.dumps(letter.as_dict()))
                else:
                    print(f"{letter.id} {letter.op} {spec.name}:{letter.key} error: {letter.error}")
            print(f"{len(letters)} dead letter(s) shown", file=sys.stderr)
        elif args.action == "replay":
            for letter in letters:
                result = replay(
                    cache.redis,
                    cache.keys,
                    spec,
                    letter,
                    force=args.force,
                    memory_headroom=settings.redis.memory_headroom,
                )
                outcome = (
                    "superseded by a newer write, dropped"
                    if result == "superseded"
                    else f"replayed as {result}"
                )
                print(f"{letter.id} {spec.name}:{letter.key}: {outcome}")
        else:
            for letter in letters:
                discard(cache.redis, cache.keys, spec.name, letter.id)
                print(f"{letter.id} {spec.name}:{letter.key}: discarded")
    finally:
        cache.close()
    return OK


def doctor(settings: Settings, args: argparse.Namespace) -> int:
    """Check what production needs; on each failure, say how to fix it. Exit 1 on any."""
    from cachewarden.operator.doctor import run_checks

    client = redis_client(settings.redis)
    try:
        findings = run_checks(settings, client)
    finally:
        client.close()
    if getattr(args, "json", False):
        print(json.dumps([f.as_dict() for f in findings]))
    else:
        for f in findings:
            print(f"{'PASS' if f.ok else 'FAIL'}  {f.check}: {f.detail}")
            if not f.ok and f.fix:
                print(f"      fix: {f.fix}")
        failed = sum(not f.ok for f in findings)
        print(f"doctor: {len(findings) - failed} passed, {failed} failed")
    return FAILED if any(not f.ok for f in findings) else OK


def flush(settings: Settings, args: argparse.Namespace) -> int:
    """Make every shard with pending writes due now, and wait until the buffer drains (the
    shards of the count Redis records: see operator/flush.py)."""
    from cachewarden.operator.flush import drain

    names = [settings.entity(args.entity).name] if args.entity else list(settings.entities)
    with _redis(settings) as client:
        first, left = drain(
            client,
            Keyspace(settings.redis.prefix),
            {n: settings.entity(n).write_behind.shards for n in names},
            args.timeout,
            lambda line: print(f"flush: {line}", file=sys.stderr),
            settings.queue("writebehind"),
        )
    if left:
        print(f"flush: {left:,} writes still pending after {args.timeout:.0f}s", file=sys.stderr)
        return FAILED
    print(f"flush: {first:,} pending writes of {', '.join(names)} reached the database")
    return OK


def reshard(settings: Settings, args: argparse.Namespace) -> int:
    """Drain an entity's buffer through its old shards, then record the new count."""
    from cachewarden.context import Context
    from cachewarden.writebehind.reshard import reshard as move

    context = Context(settings)
    try:
        move(context, args.entity, args.shards)
    except RedisError as exc:
        raise BackendUnavailable(f"Redis at {settings.redis.shown}: {exc}") from None
    finally:
        context.close()
    return OK


def scheduler(settings: Settings, args: argparse.Namespace) -> int:
    """Run the scheduler process until stopped (SIGHUP reads the config again)."""
    from cachewarden.operator.scheduler import run_scheduler

    run_scheduler(settings, args.config)
    return OK


def warm(settings: Settings, args: argparse.Namespace) -> int:
    """Run a warming job now and follow it to its end."""
    from cachewarden.operator.warm import warm as follow

    job = settings.job(args.job)
    if args.timeout is None:
        args.timeout = job.timeout_ms / 1000 + 60
    return follow(settings, args)


def jobs(settings: Settings, args: argparse.Namespace) -> int:
    """List the warming jobs and their runs."""
    from cachewarden.operator.warm import jobs as list_jobs

    return list_jobs(settings, args)


def demo(settings: Settings, _args: argparse.Namespace) -> int:
    """Create a users-like table for each configured entity whose table is missing."""
    from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table

    engine = make_engine(settings.database)
    metadata = MetaData()
    for spec in settings.entities.values():
        columns: list[Column[Any]] = [
            *(Column(c, Integer, primary_key=True, autoincrement=False) for c in spec.key_columns),
            Column("name", String(200), nullable=False),
            Column("email", String(200)),
        ]
        if spec.version_column:
            columns.append(Column(spec.version_column, BigInteger, nullable=False, default=0))
        Table(spec.table, metadata, *columns)
    metadata.create_all(engine, checkfirst=True)
    for spec in settings.entities.values():
        print(f"table {spec.table} ready in {describe(engine)}")
    engine.dispose()
    return OK
