"""Read-path benchmark: stampedes, refresh-ahead over a Zipf workload, sweep reloads, hits.

cachewarden is measured next to naive cache-aside and dogpile.cache (Redis backend,
distributed lock) in the same run, and the table ends with PASS/MISS per target.
Not a pytest test: run it by hand.

    .venv/bin/python ops/bench/readpath.py                # 60 s of Zipf reads per system
    .venv/bin/python ops/bench/readpath.py --seconds 10   # a quicker look

Each run uses fresh Redis key prefixes and Celery queue and a fresh PostgreSQL
schema, and removes them at the end (also on Ctrl-C or failure).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
import sqlalchemy as sa

from cachewarden.cache import Cache
from cachewarden.refresh import sweep_entity
from cachewarden.runtime import Runtime
from cachewarden.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
SYSTEMS = ("cachewarden", "cache-aside", "dogpile.cache")
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


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


# -- the three readers ---------------------------------------------------------------


class Reader:
    """One process's way of reading a row through the cache (what the benchmark compares)."""

    misses = 0
    loads = 0

    def read(self, key: int) -> Any:
        raise NotImplementedError

    def counts(self) -> tuple[int, int]:
        """(misses, database loads) so far in this process."""
        return self.misses, self.loads


class CachewardenReader(Reader):
    def __init__(self, config: str, entity: str, threads: int) -> None:
        settings = load_settings(config)
        client = redis.Redis.from_url(
            settings.redis.url, decode_responses=True, max_connections=threads + 10
        )
        self.cache = Cache(settings, redis=client)
        self.entity = entity

    def read(self, key: int) -> Any:
        return self.cache.get(self.entity, key)

    def counts(self) -> tuple[int, int]:
        stats = self.cache.reader.stats
        return stats.misses, stats.loads


class _Counting(Reader):
    def __init__(self) -> None:
        self._lock = threading.Lock()

    def count(self, misses: int = 0, loads: int = 0) -> None:
        with self._lock:
            self.misses += misses
            self.loads += loads


class AsideReader(_Counting):
    """Naive cache-aside: GET; on a miss, load and SET with the TTL. No lock, no refresh."""

    def __init__(self, env: dict[str, Any], sql: str, threads: int) -> None:
        super().__init__()
        self.redis = redis.Redis.from_url(
            env["redis_url"], decode_responses=True, max_connections=threads + 10
        )
        self.engine = sa.create_engine(env["sa_url"], pool_size=5, max_overflow=0)
        self.sql, self.prefix, self.ttl_ms = sa.text(sql), env["prefix"], env["ttl_ms"]

    def read(self, key: int) -> Any:
        value = self.redis.get(f"{self.prefix}:{key}")
        if value is not None:
            return json.loads(value)
        self.count(misses=1, loads=1)
        with self.engine.connect() as conn:
            row = conn.execute(self.sql, {"key": key}).mappings().first()
        data = dict(row) if row else None
        self.redis.set(f"{self.prefix}:{key}", json.dumps(data), px=self.ttl_ms)
        return data


class DogpileReader(_Counting):
    """dogpile.cache, Redis backend with its distributed lock; soft expiry at the TTL."""

    def __init__(self, env: dict[str, Any], sql: str, threads: int) -> None:
        from dogpile.cache import make_region

        super().__init__()
        self.engine = sa.create_engine(env["sa_url"], pool_size=5, max_overflow=0)
        self.sql = sa.text(sql)
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
        with self.engine.connect() as conn:
            row = conn.execute(self.sql, {"key": key}).mappings().first()
        return dict(row) if row else None

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
    """Read lines "KEY RELEASE_AT"; release all threads on KEY at once; print latencies."""
    threads = spec["threads"]
    reader = make_reader(spec, threads)
    reader.read(spec["warm_key"])  # a warm process: pools and scripts ready
    print("READY", flush=True)
    for line in sys.stdin:
        key, release = line.split()
        print(
            "RESULT " + json.dumps(stampede_once(reader, int(key), float(release), threads)),
            flush=True,
        )


def stampede_once(reader: Reader, key: int, release: float, threads: int) -> dict[str, Any]:
    go = threading.Event()
    out: list[float] = []
    bad = [0]

    def one() -> None:
        go.wait()
        row = reader.read(key)
        out.append(time.time() - release)
        if not row or row["id"] != key:
            bad[0] += 1

    pool = [threading.Thread(target=one) for _ in range(threads)]
    for t in pool:
        t.start()
    time.sleep(max(0.0, release - time.time()))
    go.set()
    for t in pool:
        t.join()
    return {"latencies": out, "bad": bad[0]}


class ZipfKeys:
    """Keys 1..n drawn with probability proportional to 1/rank^s."""

    def __init__(self, n: int, s: float) -> None:
        weights = [1.0 / (k**s) for k in range(1, n + 1)]
        total = sum(weights)
        acc, self.cdf = 0.0, []
        for w in weights:
            acc += w / total
            self.cdf.append(acc)

    def draw(self, rng: random.Random) -> int:
        return min(bisect.bisect_left(self.cdf, rng.random()), len(self.cdf) - 1) + 1


def child_zipf(spec: dict[str, Any]) -> None:
    """Read Zipf keys from several threads; count reads and misses after the warm-up."""
    threads = spec["threads"]
    reader = make_reader(spec, threads)
    keys = ZipfKeys(spec["keys"], spec["zipf_s"])
    start, boundary, end = spec["start"], spec["start"] + spec["warmup"], spec["end"]
    counts = {"reads": 0}
    lock = threading.Lock()

    def run(n: int) -> None:
        rng = random.Random(spec["seed"] * 1000 + n)
        reads = 0
        while time.time() < boundary:
            reader.read(keys.draw(rng))
        while time.time() < end:
            reader.read(keys.draw(rng))
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


def spawn(spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


# -- the environment -------------------------------------------------------------------


@dataclass
class Env:
    """One run's resources; cleanup() removes them."""

    args: argparse.Namespace
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cwread-")))
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def schema(self) -> str:
        return f"cwread_{self.run_id}"

    @property
    def base(self) -> str:
        return f"cwr{self.run_id}"

    @property
    def sa_url(self) -> str:
        return f"{self.args.pg_url}?options=-csearch_path%3D{self.schema}"

    def pg(self) -> psycopg.Connection[Any]:
        dsn = self.args.pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
        return psycopg.connect(dsn, autocommit=True, options=f"-csearch_path={self.schema}")

    def setup(self) -> None:
        rows = max(self.args.keys, self.args.sweep_keys, 1000)
        with self.pg() as conn:
            conn.execute(f'CREATE SCHEMA "{self.schema}"')
            conn.execute(f'SET search_path TO "{self.schema}"')
            conn.execute(SCHEMA_SQL.format(rows=rows).encode())

    def loader_calls(self) -> int:
        with self.pg() as conn:
            row = conn.execute("SELECT pg_sequence_last_value('loader_calls')").fetchone()
        return int(row[0] or 0) if row else 0

    def config(self, name: str, entity: dict[str, Any], file: str = "") -> Path:
        """Write a config with its own key prefix and queue (both named by `name`)."""
        a = self.args
        lines = [
            "[redis]",
            f'url = "{a.redis_url}"',
            f'prefix = "{self.base}-{name}"',
            "",
            "[database]",
            f'url = "{self.sa_url}"',
            "",
            "[celery]",
            f'queue = "{self.base}-{name}-q"',
            "",
            "[dispatch]",
            'interval = "50ms"',
            "",
            "[entities.row]",
            'table = "rows"',
            'key = "id"',
        ]
        for key, value in entity.items():
            lines.append(f"{key} = {json.dumps(value)}")
        path = self.tmp / f"{file or name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def worker(self, config: Path, log: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, "CACHEWARDEN_CONFIG": str(config), "CACHEWARDEN_LOG_FORMAT": "json"}
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            "worker",
            "--concurrency",
            str(self.args.concurrency),
            "-n",
            f"bench-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.workers.append(proc)
        deadline = time.monotonic() + 90
        while " ready." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.05)
        return proc

    def stop_worker(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def cleanup(self) -> None:
        for proc in self.workers:
            self.stop_worker(proc)
        try:
            client = redis.Redis.from_url(self.args.redis_url, decode_responses=True)
            for pattern in (f"{self.base}*", f"*{self.base}*"):
                keys = list(client.scan_iter(pattern, count=5000))
                for i in range(0, len(keys), 1000):
                    client.delete(*keys[i : i + 1000])
            client.close()
        except redis.RedisError as exc:
            say(f"cleanup: Redis keys under {self.base!r} not removed: {exc}")
        try:
            with self.pg() as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        except psycopg.Error as exc:
            say(f"cleanup: schema {self.schema} not dropped: {exc}")
        if not self.args.keep_logs:
            for path in self.tmp.iterdir():
                path.unlink()
            self.tmp.rmdir()


def reader_spec(
    env: Env, system: str, mode: str, sql: str, ttl_ms: int, config: Path | None
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


# -- phase 1: stampede -------------------------------------------------------------------


@dataclass
class Stampede:
    calls: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)
    overheads: list[float] = field(default_factory=list)
    bad: int = 0


def phase_stampede(env: Env) -> dict[str, Stampede]:
    a = env.args
    sql = f"SELECT * FROM slow_row(:key, {a.loader_ms})"
    out: dict[str, Stampede] = {}
    for n, system in enumerate(SYSTEMS):
        say(f"stampede: {system}")
        config = env.config(f"st{n}", {"ttl": "10m", "loader": sql})
        spec = reader_spec(env, system, "stampede", sql, 600_000, config)
        procs = []
        for p in range(a.procs):
            procs.append(spawn({**spec, "threads": a.threads, "warm_key": 900 + 10 * n + p}))
        result = Stampede()
        try:
            for proc in procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "READY":
                    raise RuntimeError(f"a {system} reader process did not start")
            for r in range(a.rounds):
                key = 100 * (n + 1) + r
                before = env.loader_calls()
                release = time.time() + 0.3
                for proc in procs:
                    assert proc.stdin is not None
                    proc.stdin.write(f"{key} {release}\n")
                    proc.stdin.flush()
                lat: list[float] = []
                for proc in procs:
                    assert proc.stdout is not None
                    data = json.loads(proc.stdout.readline()[len("RESULT ") :])
                    lat += data["latencies"]
                    result.bad += data["bad"]
                result.calls.append(env.loader_calls() - before)
                result.latencies += lat
                result.firsts.append(min(lat))
                result.overheads.append(percentile(lat, 0.99) - min(lat))
        finally:
            for proc in procs:
                stop(proc)
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


def worker_refreshes(log: Path, start: float, end: float) -> tuple[int, int]:
    """(SELECTs, rows leased) of the worker's refresh tasks that finished in [start, end)."""
    queries = rows = 0
    for line in log.read_text(errors="replace").splitlines():
        if '"refresh_done"' not in line:
            continue
        event = json.loads(line)
        at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        if start <= at < end:
            queries += int(event.get("batches", 0))
            rows += int(event.get("leased", 0))
    return queries, rows


def phase_zipf(env: Env) -> dict[str, ZipfRun]:
    a = env.args
    ttl_ms = int(a.ttl * 1000)
    sql = "SELECT * FROM rows WHERE id = :key"
    out: dict[str, ZipfRun] = {}
    for n, system in enumerate(SYSTEMS):
        say(f"zipf: {system} ({a.ttl:g} s warm-up, then {a.seconds:g} s measured)")
        config = env.config(f"z{n}", {"ttl": f"{ttl_ms}ms", "refresh_ahead": a.refresh_ahead})
        log = env.tmp / f"worker-z{n}.log"
        worker = env.worker(config, log) if system == "cachewarden" else None
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
        procs = [spawn({**spec, "seed": a.seed + p}) for p in range(a.procs_zipf)]
        run = ZipfRun(seconds=a.seconds)
        try:
            for proc in procs:
                assert proc.stdout is not None
                data = json.loads(proc.stdout.readline()[len("RESULT ") :])
                run.reads += data["reads"]
                run.misses += data["misses"]
                run.queries += data["loads"]
                run.rows += data["loads"]
        finally:
            for proc in procs:
                stop(proc)
        if worker is not None:
            time.sleep(1.0)
            env.stop_worker(worker)
            queries, rows = worker_refreshes(log, start + a.ttl, spec["end"])
            run.queries += queries
            run.rows += rows
        out[system] = run
    return out


# -- phase 3: sweep reload rate, and a plain batched reload for comparison ------------------


@dataclass
class SweepRun:
    keys: int = 0
    seconds: float = 0.0
    plain_keys: int = 0
    plain_seconds: float = 0.0


def phase_sweep(env: Env) -> SweepRun:
    a = env.args
    n = a.sweep_keys
    # Keys are cached and read with a 600 s TTL and refresh-ahead 0.5 (none is due yet);
    # the sweep then runs with refresh-ahead 0.01 (a 594 s window): every key is due once
    # it is 6 s old, and none is due again for 6 s after its reload.
    cached = env.config("sw", {"ttl": "600s", "refresh_ahead": 0.5})
    sweeping = env.config("sw", {"ttl": "600s", "refresh_ahead": 0.01}, file="sw-sweep")
    cache = Cache(load_settings(cached))
    keys = list(range(1, n + 1))
    try:
        say(f"sweep: caching {n:,} keys and reading each once (hot)")
        for i in range(0, n, 1000):
            cache.get_many("row", keys[i : i + 1000])
        for i in range(0, n, 1000):
            cache.get_many("row", keys[i : i + 1000])
    finally:
        cache.close()
    rt = Runtime.build(load_settings(sweeping))
    try:
        time.sleep(6.5)
        say("sweep: reloading them all in one sweep (one process)")
        rt.loader("row")
        started = time.perf_counter()
        result = sweep_entity(rt, "row")
        seconds = time.perf_counter() - started
        filled = sum(r.filled for r in result.refreshed)
    finally:
        rt.close()
    plain = plain_reload(env, keys)
    return SweepRun(keys=filled, seconds=seconds, plain_keys=n, plain_seconds=plain)


def plain_reload(env: Env, keys: list[int]) -> float:
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


def phase_hit(env: Env, calls: int = 20_000) -> HitRun:
    config = env.config("hit", {"ttl": "10m"})
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


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@dataclass
class Results:
    stampede: dict[str, Stampede] | None = None
    zipf: dict[str, ZipfRun] | None = None
    sweep: SweepRun | None = None
    hit: HitRun | None = None


def report(env: Env, res: Results) -> bool:
    a = env.args
    rows = [["measure", *SYSTEMS, "target", "result"]]
    oks: list[bool] = []

    def add(name: str, cells: list[str], target: str = "", ok: bool | None = None) -> None:
        rows.append([name, *cells, target, "" if ok is None else verdict(ok)])
        if ok is not None:
            oks.append(ok)

    if res.stampede:
        st = res.stampede
        label = f"stampede ({a.procs} procs x {a.threads} threads, {a.loader_ms} ms loader)"
        calls = [max(st[s].calls) for s in SYSTEMS]
        add(f"{label}: loader calls per stampede", [str(c) for c in calls], "1", calls[0] == 1)
        add(
            "stampede: reader p50",
            [f"{percentile(st[s].latencies, 0.5) * 1000:.0f} ms" for s in SYSTEMS],
        )
        add(
            "stampede: reader p99",
            [f"{percentile(st[s].latencies, 0.99) * 1000:.0f} ms" for s in SYSTEMS],
        )
        add(
            "stampede: the load as run (first reader back)",
            [f"{percentile(st[s].firsts, 0.5) * 1000:.0f} ms" for s in SYSTEMS],
        )
        best = min(st["cachewarden"].overheads)
        add(
            "stampede: p99 - load (best round)",
            [f"{min(st[s].overheads) * 1000:.0f} ms" for s in SYSTEMS],
            "<= 50 ms",
            best <= 0.05,
        )
        if any(st[s].bad for s in SYSTEMS):
            add("stampede: readers that got a wrong row", [str(st[s].bad) for s in SYSTEMS])
    if res.zipf:
        z = res.zipf
        label = f"Zipf s={a.zipf_s} over {a.keys:,} keys, TTL {a.ttl:g} s, {a.seconds:g} s"
        ratios = [z[s].misses / max(1, z[s].reads) for s in SYSTEMS]
        add(
            f"{label}: miss ratio after warm-up",
            [f"{r:.4%}" for r in ratios],
            "< 0.1%",
            ratios[0] < 0.001,
        )
        windows = a.seconds / a.ttl
        add(
            "Zipf: misses per key per TTL window",
            [f"{z[s].misses / (a.keys * windows):.3f}" for s in SYSTEMS],
        )
        add("Zipf: reads/s", [f"{z[s].reads / a.seconds:,.0f}" for s in SYSTEMS])
        add("Zipf: database queries/s", [f"{z[s].queries / a.seconds:,.0f}" for s in SYSTEMS])
        add("Zipf: rows loaded/s", [f"{z[s].rows / a.seconds:,.0f}" for s in SYSTEMS])
    if res.sweep:
        sw = res.sweep
        rate = sw.keys / sw.seconds
        plain = sw.plain_keys / sw.plain_seconds if sw.plain_seconds else math.nan
        add(
            f"sweep reload from PostgreSQL ({sw.keys:,} hot keys, 1 process)",
            [f"{rate:,.0f} keys/s", f"{plain:,.0f} keys/s (plain IN + pipeline)", "-"],
            ">= 20,000 keys/s",
            rate >= 20_000,
        )
    if res.hit:
        h = res.hit
        add(
            "get() hit: Redis round trips",
            [f"{h.round_trips:g}", "1 (GET)", "-"],
            "1",
            h.round_trips == 1,
        )
        add(
            "get() hit p50 / p99 (vs a plain GET)",
            [
                f"{percentile(h.get_us, 0.5):.0f} / {percentile(h.get_us, 0.99):.0f} us",
                f"{percentile(h.redis_get_us, 0.5):.0f} / {percentile(h.redis_get_us, 0.99):.0f} us",
                "-",
            ],
        )
    print(render(rows))
    return all(oks)


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
        help="threads per reader process (default: 125 stampede, 2 Zipf)",
    )
    p.add_argument("--procs", type=int, default=4, help="stampede processes (default 4)")
    p.add_argument("--loader-ms", type=int, default=200, help="stampede load time (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="stampedes per system (default 3)")
    p.add_argument("--sweep-keys", type=int, default=50_000, help="default 50000")
    p.add_argument("--concurrency", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/13",
        help="Redis for the caches and the Celery broker (default db 13)",
    )
    p.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    p.add_argument(
        "--phases",
        default="stampede,zipf,sweep,hit",
        help="comma-separated subset of: stampede,zipf,sweep,hit",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir (worker logs)")
    args = p.parse_args(argv)
    args.phases = {s.strip() for s in args.phases.split(",") if s.strip()}
    unknown = args.phases - {"stampede", "zipf", "sweep", "hit"}
    if unknown:
        p.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    return args


@contextmanager
def environment(args: argparse.Namespace) -> Iterator[Env]:
    env = Env(args)
    env.setup()
    try:
        yield env
    finally:
        env.cleanup()


def run_phase(name: str, fn: Callable[[], Any]) -> Any:
    say(f"phase: {name}")
    return fn()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return 0
    args = parse_args(argv)
    print("cachewarden read-path benchmark")
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(
        f"machine: nproc={os.cpu_count()} ({platform.machine()}), "
        f"load average at start: {loadavg()}"
    )
    res = Results()
    with environment(args) as env:
        stampede_threads = args.threads or 125
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
        ok = report(env, res)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
