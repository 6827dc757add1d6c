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

Two runs (say of the code before and after a change, each from its own checkout) can
take turns round by round (`--take-turns FILE:NAME:ORDER`, e.g. ORDER
`before,after,after,before`), so that the machine's drift hits both alike; every
round's load average is printed either way.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
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
    from cachewarden.keys import Keyspace
    from cachewarden.settings import load_settings

ENTITY = "row"
COLUMNS = ("id", "name", "score", "version")
PHASES = ("latency", "batch", "through", "raw", "flush", "zipf", "mariadb", "sqlite")
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


def latency_rows(lat: LatencyResult) -> tuple[list[list[str]], list[tuple[str, bool | None]]]:
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


def dialect_rows(
    a: argparse.Namespace, d: DialectRun
) -> tuple[list[list[str]], list[tuple[str, bool | None]]]:
    """A MariaDB or SQLite run's rows of the table, and its targets."""
    rows: list[list[str]] = []
    targets: list[tuple[str, bool | None]] = []
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
    targets: list[tuple[str, bool | None]] = []
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
    print(render(rows))
    print()
    notes(a, res)
    print()
    all_ok = True
    for name, met in targets:
        print(f"{verdict(met):7} {name}")
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
    add_common_args(p, redis_db=12, phases=PHASES)
    args = p.parse_args(argv)
    args.keys = args.keys or args.writes
    parse_phases(p, args, PHASES)
    for name in (
        "writes",
        "latency_writes",
        "batch_rows",
        "batch_rounds",
        "zipf_writes",
        "rounds",
        "dialect_writes",
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
