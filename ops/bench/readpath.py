"""Read-path benchmark: stampedes, refresh-ahead over a Zipf workload, sweep reloads, hits.

cachewarden is measured next to naive cache-aside and dogpile.cache (Redis backend,
distributed lock) in the same run, and the table ends with PASS/MISS per target.
Not a pytest test: run it by hand (see README.md).

    .venv/bin/python ops/bench/readpath.py                # 60 s of Zipf reads per system
    .venv/bin/python ops/bench/readpath.py --seconds 10   # a quicker look

Each run uses fresh Redis key prefixes and Celery queue and a fresh PostgreSQL
schema, and removes them at the end (also on Ctrl-C or failure). The scaffolding
(resources, workers, the table) is common.py's, shared with writebehind.py.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, however we are started

import redis
import sqlalchemy as sa
from common import (
    Env,
    Worker,
    Zipf,
    add_common_args,
    loadavg,
    parse_phases,
    percentile,
    render,
    run,
    run_phase,
    say,
    verdict,
)

from cachewarden.cache import Cache
from cachewarden.context import Context
from cachewarden.readpath.sqlload import loader_for
from cachewarden.readpath.sweep import sweep_entity
from cachewarden.settings import load_settings

SYSTEMS = ("cachewarden", "cache-aside", "dogpile.cache")
PHASES = ("stampede", "zipf", "sweep", "hit")
SCHEMA_SQL = """
CREATE TABLE rows (id BIGINT PRIMARY KEY, name VARCHAR(200) NOT NULL,
                   score INTEGER NOT NULL, version BIGINT NOT NULL DEFAULT 0);
INSERT INTO rows SELECT g, 'row-' || g, g % 1000, 1 FROM generate_series(1, {rows}) g;
CREATE SEQUENCE loader_calls;
CREATE FUNCTION slow_row(k BIGINT, ms INTEGER) RETURNS SETOF rows LANGUAGE plpgsql AS $$
BEGIN
  PERFORM nextval('loader_calls');
  PERFORM pg_sleep(ms / 1000.0);
  RETURN QUERY SELECT * FROM rows WHERE id = k;
END $$;
"""


# -- the three readers ---------------------------------------------------------------


class Reader:
    """One process's way of reading a row through the cache (what the benchmark compares).

    `load_times` holds the wall time of each database load this process ran, timed
    around the load call (pool checkout, the query, fetching the row).
    """

    misses = 0
    loads = 0

    def __init__(self) -> None:
        self.load_times: list[float] = []

    def read(self, key: int) -> Any:
        raise NotImplementedError

    def counts(self) -> tuple[int, int]:
        """(misses, database loads) so far in this process."""
        return self.misses, self.loads


class CachewardenReader(Reader):
    def __init__(self, config: str, entity: str, threads: int) -> None:
        super().__init__()
        settings = load_settings(config)
        client = redis.Redis.from_url(
            settings.redis.url, decode_responses=True, max_connections=threads + 10
        )
        self.cache = Cache(settings, redis=client)  # reflects the table, as an app's would
        self.entity = entity
        # Time the loader's own work where it runs: this process's SqlLoader.load.
        loader = loader_for(self.cache.context, entity)
        plain = loader.load

        def timed(key: str) -> Any:
            start = time.perf_counter()
            try:
                return plain(key)
            finally:
                self.load_times.append(time.perf_counter() - start)

        loader.load = timed  # type: ignore[method-assign]

    def read(self, key: int) -> Any:
        return self.cache.get(self.entity, key)

    def counts(self) -> tuple[int, int]:
        stats = self.cache.reader.stats
        return stats.misses, stats.loads


class _Counting(Reader):
    def __init__(self, env: dict[str, Any], sql: str) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.engine = sa.create_engine(env["sa_url"], pool_size=5, max_overflow=0)
        self.sql = sa.text(sql)
        with self.engine.connect() as conn:  # one pooled connection, as cachewarden's reflection
            conn.execute(sa.text("SELECT 1"))

    def count(self, misses: int = 0, loads: int = 0) -> None:
        with self._lock:
            self.misses += misses
            self.loads += loads

    def load(self, key: int) -> Any:
        start = time.perf_counter()
        with self.engine.connect() as conn:
            row = conn.execute(self.sql, {"key": key}).mappings().first()
        self.load_times.append(time.perf_counter() - start)
        return dict(row) if row else None


class AsideReader(_Counting):
    """Naive cache-aside: GET; on a miss, load and SET with the TTL. No lock, no refresh."""

    def __init__(self, env: dict[str, Any], sql: str, threads: int) -> None:
        super().__init__(env, sql)
        self.redis = redis.Redis.from_url(
            env["redis_url"], decode_responses=True, max_connections=threads + 10
        )
        self.prefix, self.ttl_ms = env["prefix"], env["ttl_ms"]

    def read(self, key: int) -> Any:
        value = self.redis.get(f"{self.prefix}:{key}")
        if value is not None:
            return json.loads(value)
        self.count(misses=1, loads=1)
        data = self.load(key)
        self.redis.set(f"{self.prefix}:{key}", json.dumps(data), px=self.ttl_ms)
        return data


class DogpileReader(_Counting):
    """dogpile.cache, Redis backend with its distributed lock; soft expiry at the TTL."""

    def __init__(self, env: dict[str, Any], sql: str, threads: int) -> None:
        from dogpile.cache import make_region

        super().__init__(env, sql)
        url = env["redis_url"]
        pool = redis.ConnectionPool.from_url(url, max_connections=threads + 10)
        prefix = env["prefix"]
        ttl_s = env["ttl_ms"] / 1000
        self.region = make_region(key_mangler=lambda k: f"{prefix}:{k}").configure(
            "dogpile.cache.redis",
            expiration_time=ttl_s,
            arguments={
                "connection_pool": pool,
                "distributed_lock": True,
                "thread_local_lock": False,
                "lock_timeout": 30,
                "redis_expiration_time": int(ttl_s * 2) + 1,
            },
        )

    def _create(self, key: int) -> Any:
        self.count(misses=1, loads=1)
        return self.load(key)

    def read(self, key: int) -> Any:
        return self.region.get_or_create(str(key), lambda: self._create(key))


def make_reader(spec: dict[str, Any], threads: int) -> Reader:
    system = spec["system"]
    if system == "cachewarden":
        return CachewardenReader(spec["config"], spec["entity"], threads)
    if system == "cache-aside":
        return AsideReader(spec, spec["sql"], threads)
    return DogpileReader(spec, spec["sql"], threads)


# -- child processes -----------------------------------------------------------------


def child_stampede(spec: dict[str, Any]) -> None:
    """One stampede in this fresh process: build the reader, say READY, read the line
    "KEY RELEASE_AT", release all threads on KEY at that time, print the result."""
    threads = spec["threads"]
    reader = make_reader(spec, threads)
    print("READY", flush=True)
    line = sys.stdin.readline()
    if not line:
        return  # the parent gave up
    key, release = line.split()
    print(
        "RESULT " + json.dumps(stampede_once(reader, int(key), float(release), threads)),
        flush=True,
    )


def stampede_once(reader: Reader, key: int, release: float, threads: int) -> dict[str, Any]:
    go = threading.Event()
    out: list[float] = []
    bad = [0]
    errors: list[str] = []
    # Readers stay alive until all have their row, as an application's request threads
    # do: the exits of early threads must not delay the later readers.
    done = threading.Barrier(threads)

    def one() -> None:
        go.wait()
        try:
            row = reader.read(key)
        except Exception as exc:  # counted and reported, not a silent missing sample
            errors.append(f"{type(exc).__name__}: {exc}")
            done.wait()
            return
        out.append(time.time() - release)
        if not row or row["id"] != key:
            bad[0] += 1
        done.wait()

    pool = [threading.Thread(target=one) for _ in range(threads)]
    for t in pool:
        t.start()
    time.sleep(max(0.0, release - time.time()))
    late = time.time() - release
    go.set()
    for t in pool:
        t.join()
    return {
        "latencies": out,
        "bad": bad[0],
        "errors": errors,
        "loads": reader.load_times,
        "late": late,
    }


def child_zipf(spec: dict[str, Any]) -> None:
    """Read Zipf keys from several threads; count reads and misses after the warm-up."""
    threads = spec["threads"]
    reader = make_reader(spec, threads)
    keys = Zipf(spec["keys"], spec["zipf_s"])
    start, boundary, end = spec["start"], spec["start"] + spec["warmup"], spec["end"]
    counts = {"reads": 0}
    lock = threading.Lock()

    def run(n: int) -> None:
        rng = random.Random(spec["seed"] * 1000 + n)
        reads = 0
        while time.time() < boundary:
            reader.read(keys.sample(rng))
        while time.time() < end:
            reader.read(keys.sample(rng))
            reads += 1
        with lock:
            counts["reads"] += reads

    time.sleep(max(0.0, start - time.time()))
    pool = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    time.sleep(max(0.0, boundary - time.time()))
    at_boundary = reader.counts()
    time.sleep(max(0.0, end - time.time()))
    at_end = reader.counts()
    for t in pool:
        t.join()
    print(
        "RESULT "
        + json.dumps(
            {
                "reads": counts["reads"],
                "misses": at_end[0] - at_boundary[0],
                "loads": at_end[1] - at_boundary[1],
            }
        ),
        flush=True,
    )


def child_main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    if spec["mode"] == "stampede":
        child_stampede(spec)
    else:
        child_zipf(spec)


# -- the environment (common.Env) ------------------------------------------------------


class ReadEnv(Env):
    """common.Env plus the rows table, the slow loader and the reader processes."""

    schema_prefix = "cwread"
    key_prefix = "cwr"
    entity = "row"

    def setup(self) -> None:
        super().setup()
        rows = max(self.args.keys, self.args.sweep_keys, 1000)
        with self.pg() as conn:
            conn.execute(SCHEMA_SQL.format(rows=rows).encode())

    def loader_calls(self) -> int:
        with self.pg() as conn:
            row = conn.execute("SELECT pg_sequence_last_value('loader_calls')").fetchone()
        return int(row[0] or 0) if row else 0

    def read_config(self, name: str, entity: dict[str, Any], file: str = "") -> Path:
        """A config with its own key prefix and queue: the entity `row` on table `rows`."""
        return self.config(name, "rows", entity, file=file)

    def reader(self, spec: dict[str, Any]) -> Any:
        """A fresh reader process of this script (killed by cleanup() if not before)."""
        return self.spawn([__file__, "--child", json.dumps(spec)])


def reader_spec(
    env: ReadEnv, system: str, mode: str, sql: str, ttl_ms: int, config: Path | None
) -> dict[str, Any]:
    return {
        "system": system,
        "mode": mode,
        "config": str(config) if config else "",
        "entity": "row",
        "sql": sql,
        "redis_url": env.args.redis_url,
        "sa_url": env.sa_url,
        "prefix": f"{env.base}-{system}-{mode}",
        "ttl_ms": ttl_ms,
    }


def result_line(proc: Any, system: str) -> dict[str, Any]:
    """The child's RESULT line, decoded (an error naming the system if it died)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("RESULT "):
        raise RuntimeError(f"a {system} reader process failed (see its traceback above)")
    data: dict[str, Any] = json.loads(line[len("RESULT ") :])
    return data


# -- phase 1: stampede -------------------------------------------------------------------


@dataclass
class Stampede:
    calls: list[int] = field(default_factory=list)  # per round: loader calls in the database
    latencies: list[float] = field(default_factory=list)  # every reader of every round
    firsts: list[float] = field(default_factory=list)  # per round: the first reader back
    overheads: list[float] = field(default_factory=list)  # per round: p99 - first reader back
    loads: list[float] = field(default_factory=list)  # per round: the load's own time
    excess: list[float] = field(default_factory=list)  # every reader: latency - its round's load
    late: float = 0.0  # the latest any process released its readers, after the release time
    bad: int = 0
    errors: list[str] = field(default_factory=list)


def stampede_round(env: ReadEnv, spec: dict[str, Any], key: int, result: Stampede) -> None:
    """One stampede on `key` in `procs` freshly started processes: each builds its reader,
    then every reader of every process starts at one shared release time."""
    a = env.args
    procs = [env.reader({**spec, "threads": a.threads}) for _ in range(a.procs)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError(f"a {spec['system']} reader process did not start")
        before = env.loader_calls()
        release = time.time() + a.release_s
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{key} {release}\n")
            proc.stdin.flush()
        lat: list[float] = []
        loads: list[float] = []
        for proc in procs:
            data = result_line(proc, spec["system"])
            lat += data["latencies"]
            loads += data["loads"]
            result.bad += data["bad"]
            result.errors += data["errors"]
            result.late = max(result.late, data["late"])
    finally:
        for proc in procs:
            env.reap(proc)
    result.calls.append(env.loader_calls() - before)
    result.latencies += lat
    if lat:
        result.firsts.append(min(lat))
        result.overheads.append(percentile(lat, 0.99) - min(lat))
    # The load's own time: the one load (or, where several ran, the fastest of them),
    # as timed by the process that ran it.
    if loads:
        result.loads.append(min(loads))
        result.excess += [t - min(loads) for t in lat]
    else:
        result.errors.append(f"key {key}: no process timed a load (the round is not counted)")


def phase_stampede(env: ReadEnv) -> dict[str, Stampede]:
    a = env.args
    sql = f"SELECT * FROM slow_row(:key, {a.loader_ms})"
    out: dict[str, Stampede] = {}
    for n, system in enumerate(SYSTEMS):
        config = env.read_config(f"st{n}", {"ttl": "10m", "loader": sql})
        spec = reader_spec(env, system, "stampede", sql, 600_000, config)
        result = Stampede()
        for r in range(a.rounds):  # each round a new key, in new processes
            say(f"stampede: {system}, round {r + 1}/{a.rounds}")
            stampede_round(env, spec, 100 * (n + 1) + r, result)
        out[system] = result
    return out


# -- phase 2: refresh-ahead over a Zipf workload -----------------------------------------


@dataclass
class ZipfRun:
    reads: int = 0
    misses: int = 0
    queries: int = 0
    rows: int = 0
    seconds: float = 0.0


def worker_refreshes(worker: Worker, start: float, end: float) -> tuple[int, int]:
    """(SELECTs, rows leased) of the worker's refresh tasks that finished in [start, end)."""
    queries = rows = 0
    for event in worker.events("refresh_done"):
        at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        if start <= at < end:
            queries += int(event.get("batches", 0))
            rows += int(event.get("leased", 0))
    return queries, rows


def phase_zipf(env: ReadEnv) -> dict[str, ZipfRun]:
    a = env.args
    ttl_ms = int(a.ttl * 1000)
    sql = "SELECT * FROM rows WHERE id = :key"
    out: dict[str, ZipfRun] = {}
    for n, system in enumerate(SYSTEMS):

        def one(n: int = n, system: str = system) -> ZipfRun:
            config = env.read_config(
                f"z{n}", {"ttl": f"{ttl_ms}ms", "refresh_ahead": a.refresh_ahead}
            )
            worker = env.worker(config, f"worker-z{n}.log") if system == "cachewarden" else None
            start = time.time() + 3.0
            spec = {
                **reader_spec(env, system, "zipf", sql, ttl_ms, config),
                "threads": a.threads,
                "keys": a.keys,
                "zipf_s": a.zipf_s,
                "start": start,
                "warmup": a.ttl,
                "end": start + a.ttl + a.seconds,
            }
            procs = [env.reader({**spec, "seed": a.seed + p}) for p in range(a.procs_zipf)]
            run = ZipfRun(seconds=a.seconds)
            try:
                for proc in procs:
                    data = result_line(proc, system)
                    run.reads += data["reads"]
                    run.misses += data["misses"]
                    run.queries += data["loads"]
                    run.rows += data["loads"]
            finally:
                for proc in procs:
                    env.reap(proc)
            if worker is not None:
                time.sleep(1.0)
                worker.stop()
                queries, rows = worker_refreshes(worker, start + a.ttl, spec["end"])
                run.queries += queries
                run.rows += rows
            return run

        label = f"zipf: {system} ({a.ttl:g} s warm-up, then {a.seconds:g} s measured)"
        out[system] = run_phase(label, one)
    return out


# -- phase 3: sweep reload rate, and a plain batched reload for comparison ------------------


@dataclass
class SweepRun:
    keys: int = 0
    seconds: float = 0.0
    plain_keys: int = 0
    plain_seconds: float = 0.0


def phase_sweep(env: ReadEnv) -> SweepRun:
    a = env.args
    n = a.sweep_keys
    # Keys are cached and read with a 600 s TTL and refresh-ahead 0.5 (none is due yet);
    # the sweep then runs with refresh-ahead 0.01 (a 594 s window): every key is due once
    # it is 6 s old, and none is due again for 6 s after its reload.
    cached = env.read_config("sw", {"ttl": "600s", "refresh_ahead": 0.5})
    sweeping = env.read_config("sw", {"ttl": "600s", "refresh_ahead": 0.01}, file="sw-sweep")
    cache = Cache(load_settings(cached))
    keys = list(range(1, n + 1))
    try:
        say(f"sweep: caching {n:,} keys and reading each once (hot)")
        for _ in range(2):  # the first pass loads them, the second reads them: hot
            for i in range(0, n, 1000):
                cache.get_many("row", keys[i : i + 1000])
    finally:
        cache.close()
    context = Context.build(load_settings(sweeping))
    try:
        time.sleep(6.5)
        loader_for(context, "row")  # the table reflected before the clock starts
        started = time.perf_counter()
        say("sweep: reloading them all in one sweep (one process)")
        result = sweep_entity(context, "row")
        seconds = time.perf_counter() - started
        filled = sum(r.filled for r in result.refreshed)
    finally:
        context.close()
    plain = plain_reload(env, keys)
    return SweepRun(keys=filled, seconds=seconds, plain_keys=n, plain_seconds=plain)


def plain_reload(env: ReadEnv, keys: list[int]) -> float:
    """The same reload without cachewarden: SELECT ... IN per 1,000 keys, pipelined SETs."""
    client = redis.Redis.from_url(env.args.redis_url, decode_responses=True)
    engine = sa.create_engine(env.sa_url)
    stmt = sa.text("SELECT * FROM rows WHERE id = ANY(:ids)")
    started = time.perf_counter()
    with engine.connect() as conn:
        for i in range(0, len(keys), 1000):
            rows = conn.execute(stmt, {"ids": keys[i : i + 1000]}).mappings().all()
            pipe = client.pipeline(transaction=False)
            for row in rows:
                pipe.set(f"{env.base}-plain:{row['id']}", json.dumps(dict(row)), px=60_000)
            pipe.execute()
    seconds = time.perf_counter() - started
    engine.dispose()
    client.close()
    return seconds


# -- phase 4: what a hit costs ----------------------------------------------------------


class CountingConnection(redis.Connection):
    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


@dataclass
class HitRun:
    round_trips: float = 0.0
    get_us: list[float] = field(default_factory=list)
    redis_get_us: list[float] = field(default_factory=list)


def phase_hit(env: ReadEnv) -> HitRun:
    """`calls` get() hits of one key, each followed by a plain GET of the same entry
    (the same value) on the same client, after 1,000 untimed gets counting round trips."""
    calls = env.args.hit_calls
    config = env.read_config("hit", {"ttl": "10m"})
    settings = load_settings(config)
    pool = redis.ConnectionPool.from_url(
        settings.redis.url, decode_responses=True, connection_class=CountingConnection
    )
    client = redis.Redis(connection_pool=pool)
    cache = Cache(settings, redis=client)
    run = HitRun()
    try:
        cache.get("row", 1)
        entry = cache.keys.entry("row", "1")
        CountingConnection.sent = 0
        for _ in range(1000):
            cache.get("row", 1)
        run.round_trips = CountingConnection.sent / 1000
        for _ in range(calls):
            t = time.perf_counter_ns()
            cache.get("row", 1)
            run.get_us.append((time.perf_counter_ns() - t) / 1000)
            t = time.perf_counter_ns()
            client.get(entry)
            run.redis_get_us.append((time.perf_counter_ns() - t) / 1000)
    finally:
        cache.close()
    return run


# -- the report -----------------------------------------------------------------------------


@dataclass
class Results:
    stampede: dict[str, Stampede] | None = None
    zipf: dict[str, ZipfRun] | None = None
    sweep: SweepRun | None = None
    hit: HitRun | None = None


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


class Table:
    """The result table: one column per system, then the target and PASS/MISS."""

    def __init__(self) -> None:
        self.rows = [["measure", *SYSTEMS, "target", "result"]]
        self.oks: list[bool] = []

    def add(self, name: str, cells: list[str], target: str = "", ok: bool | None = None) -> None:
        self.rows.append([name, *cells, target, "" if ok is None else verdict(ok)])
        if ok is not None:
            self.oks.append(ok)


def stampede_rows(t: Table, a: argparse.Namespace, st: dict[str, Stampede]) -> None:
    label = (
        f"stampede ({a.procs} fresh procs x {a.threads} threads, {a.loader_ms} ms loader, "
        f"{a.rounds} rounds)"
    )
    calls = [max(st[s].calls) for s in SYSTEMS]
    t.add(
        f"{label}: loader calls per stampede (worst round)",
        [str(c) for c in calls],
        "1",
        calls[0] == 1,
    )
    t.add("stampede: reader p50 (pooled)", [ms(percentile(st[s].latencies, 0.5)) for s in SYSTEMS])
    t.add("stampede: reader p99 (pooled)", [ms(percentile(st[s].latencies, 0.99)) for s in SYSTEMS])
    t.add(
        "stampede: the load as run (first reader back, median round)",
        [ms(percentile(st[s].firsts, 0.5)) for s in SYSTEMS],
    )
    t.add(
        "stampede: the load's own time (timed where it ran, median round)",
        [ms(percentile(st[s].loads, 0.5)) for s in SYSTEMS],
    )
    t.add(
        "stampede: p99 - first reader back (best round)",
        [ms(min(st[s].overheads, default=math.nan)) for s in SYSTEMS],
    )
    excess = percentile(st["cachewarden"].excess, 0.99)
    t.add(
        "stampede: p99 of (reader latency - its round's load time), pooled",
        [ms(percentile(st[s].excess, 0.99)) for s in SYSTEMS],
        "<= 50 ms",
        excess <= 0.05 and not st["cachewarden"].errors,
    )
    if any(st[s].bad for s in SYSTEMS):
        t.add("stampede: readers that got a wrong row", [str(st[s].bad) for s in SYSTEMS])
    if any(st[s].errors for s in SYSTEMS):
        t.add("stampede: readers that failed", [str(len(st[s].errors)) for s in SYSTEMS])


def zipf_rows(t: Table, a: argparse.Namespace, z: dict[str, ZipfRun]) -> None:
    label = f"Zipf s={a.zipf_s} over {a.keys:,} keys, TTL {a.ttl:g} s, {a.seconds:g} s"
    ratios = [z[s].misses / max(1, z[s].reads) for s in SYSTEMS]
    t.add(
        f"{label}: miss ratio after warm-up",
        [f"{r:.4%}" for r in ratios],
        "< 0.1%",
        ratios[0] < 0.001,
    )
    windows = a.seconds / a.ttl
    t.add(
        "Zipf: misses per key per TTL window",
        [f"{z[s].misses / (a.keys * windows):.3f}" for s in SYSTEMS],
    )
    t.add("Zipf: reads/s", [f"{z[s].reads / a.seconds:,.0f}" for s in SYSTEMS])
    t.add("Zipf: database queries/s", [f"{z[s].queries / a.seconds:,.0f}" for s in SYSTEMS])
    t.add("Zipf: rows loaded/s", [f"{z[s].rows / a.seconds:,.0f}" for s in SYSTEMS])


def hit_rows(t: Table, h: HitRun) -> None:
    t.add(
        "get() hit: Redis round trips",
        [f"{h.round_trips:g}", "1 (GET)", "-"],
        "1",
        h.round_trips == 1,
    )
    g50, r50 = percentile(h.get_us, 0.5), percentile(h.redis_get_us, 0.5)
    t.add(
        "get() hit p50 / p99 (vs a plain GET)",
        [
            f"{g50:.0f} / {percentile(h.get_us, 0.99):.0f} us",
            f"{r50:.0f} / {percentile(h.redis_get_us, 0.99):.0f} us",
            "-",
        ],
    )
    ratio = g50 / r50 if r50 else math.inf
    t.add(
        f"get() hit p50 / plain GET p50, same value ({len(h.get_us):,} each)",
        [f"{ratio:.2f}x", "1.00x (GET)", "-"],
        "<= 1.2x",
        ratio <= 1.2,
    )


def report(env: ReadEnv, res: Results) -> bool:
    a = env.args
    t = Table()
    if res.stampede:
        stampede_rows(t, a, res.stampede)
    if res.zipf:
        zipf_rows(t, a, res.zipf)
    if res.sweep:
        sw = res.sweep
        rate = sw.keys / sw.seconds
        plain = sw.plain_keys / sw.plain_seconds if sw.plain_seconds else math.nan
        t.add(
            f"sweep reload from PostgreSQL ({sw.keys:,} hot keys, 1 process)",
            [f"{rate:,.0f} keys/s", f"{plain:,.0f} keys/s (plain IN + pipeline)", "-"],
            ">= 20,000 keys/s",
            rate >= 20_000,
        )
    if res.hit:
        hit_rows(t, res.hit)
    print(render(t.rows))
    if res.stampede:
        print()
        for s in SYSTEMS:
            st = res.stampede[s]
            print(
                f"stampede {s}: loader calls per round {st.calls}; load's own time per round "
                f"{[round(x * 1000) for x in st.loads]} ms; {len(st.latencies):,} readers "
                f"timed; the latest release was {st.late * 1000:.1f} ms late"
            )
            for e in sorted(set(st.errors))[:3]:
                print(f"stampede {s} PROBLEM: {e}")
    return all(t.oks)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ops/bench/readpath.py",
        description="Benchmark cachewarden's read path against naive cache-aside and "
        "dogpile.cache (Redis backend, distributed lock) in the same run.",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="measured seconds of Zipf reads per system, after a TTL of warm-up (default 60)",
    )
    p.add_argument("--ttl", type=float, default=5.0, help="TTL in seconds (default 5)")
    p.add_argument("--refresh-ahead", type=float, default=0.8, help="default 0.8")
    p.add_argument("--keys", type=int, default=1000, help="Zipf keys (default 1000)")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent (default 1.1)")
    p.add_argument("--procs-zipf", type=int, default=2, help="reader processes (default 2)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads per reader process (default: 50 stampede, 2 Zipf)",
    )
    p.add_argument(
        "--procs", type=int, default=4, help="stampede processes, fresh each round (default 4)"
    )
    p.add_argument("--loader-ms", type=int, default=200, help="stampede load time (default 200)")
    p.add_argument("--rounds", type=int, default=5, help="stampedes per system (default 5)")
    p.add_argument(
        "--release-s",
        type=float,
        default=0.5,
        help="seconds from the last process being ready to the stampede (default 0.5)",
    )
    p.add_argument("--sweep-keys", type=int, default=50_000, help="default 50000")
    p.add_argument("--hit-calls", type=int, default=20_000, help="timed get() hits (default 20000)")
    add_common_args(p, redis_db=13, phases=PHASES)
    args = p.parse_args(argv)
    parse_phases(p, args, PHASES)
    if not 1 <= args.rounds <= 99:
        p.error("--rounds must be 1 to 99 (each round reads a new key of 100 per system)")
    return args


def phases(env: Any) -> bool:
    args = env.args
    res = Results()
    stampede_threads = args.threads or 50
    zipf_threads = args.threads or 2
    if "stampede" in args.phases:
        args.threads = stampede_threads
        res.stampede = run_phase("stampede", lambda: phase_stampede(env))
    if "zipf" in args.phases:
        args.threads = zipf_threads
        res.zipf = run_phase("zipf", lambda: phase_zipf(env))
    args.threads = stampede_threads
    if "sweep" in args.phases:
        res.sweep = run_phase("sweep", lambda: phase_sweep(env))
    if "hit" in args.phases:
        res.hit = run_phase("hit", lambda: phase_hit(env))
    print(f"load average at end: {loadavg()}")
    print()
    return report(env, res)


def dogpile_version() -> str:
    import dogpile

    return f", dogpile.cache {getattr(dogpile, '__version__', '?')}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return 0
    args = parse_args(argv)
    return run(
        "cachewarden read-path benchmark",
        "ops/bench/readpath.py",
        lambda: ReadEnv(args),
        phases,
        extra_versions=dogpile_version,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
