"""Warming benchmark: keys warmed per second from PostgreSQL into Redis, and worker memory.

Every figure is printed next to baselines measured in the same run, in one table,
followed by PASS/MISS per target. Not a pytest test: run it by hand (see README.md).

    .venv/bin/python ops/bench/warming.py                 # 1,000,000 rows, 3 rounds
    .venv/bin/python ops/bench/warming.py --rows 200000   # a quicker look

What it compares, on one table of `--rows` rows:

- cachewarden: `cachewarden warm JOB` run as a command (its start included) against a
  running worker of `--concurrency` processes, which stream the job's keys, read its
  keyset chunks and fill them with one script call each;
- the raw limit: the same SELECT streamed through a psycopg named cursor into
  pipelined `SET key value PX ttl` (one pipeline per 5,000 rows), in one plain process;
- the naive loop: one `SET` per row, timed on the first `--naive-rows` rows (a whole
  million would take minutes; its rate does not depend on the row count).

Rounds alternate cachewarden and the raw limit; the rates are pooled (all rows over
all seconds). Then the worker's peak memory (VmHWM of each of its processes) is
measured with a fresh worker at 100,000 rows and another at `--rows`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, however we are started

from common import (
    MISSING,
    REPO,
    Env,
    Worker,
    add_common_args,
    loadavg,
    parse_phases,
    render,
    run,
    run_phase,
    say,
    verdict,
)

if MISSING is None:
    import psycopg  # noqa: F401

PHASES = ("speed", "naive", "memory")
TABLE = "warmrows"
TTL_MS = 600_000
PIPELINE_ROWS = 5000
TARGET_RAW_SHARE = 0.8
TARGET_NAIVE_RATIO = 5.0
TARGET_MEMORY_GROWTH = 0.2


class WarmEnv(Env):
    """The run's schema holds one table of `--rows` rows (and a 100,000-row view of it)."""

    key_prefix = "cwbw"

    def setup(self) -> None:
        super().setup()
        rows = self.args.rows
        say(f"filling {TABLE} with {rows:,} rows")
        with self.pg() as conn:
            conn.execute(
                f"CREATE TABLE {TABLE} (id BIGINT PRIMARY KEY, name VARCHAR(200) NOT NULL, "
                "email VARCHAR(200), score INTEGER NOT NULL, version BIGINT NOT NULL)"
            )
            conn.execute(
                f"INSERT INTO {TABLE} SELECT g, 'user ' || g, 'user' || g || '@example.com', "
                "(g::bigint * 7919) %% 100000, 1 FROM generate_series(1, %s) g",
                (rows,),
            )
            conn.execute(f"ANALYZE {TABLE}")

    def warm_config(self, name: str, query: str | None = None) -> Path:
        path = self.config(name, TABLE, {"ttl": f"{TTL_MS // 1000}s"})
        job = ["", "[warming.all]", 'entity = "row"', 'every = "1d"', "enabled = false"]
        if query:
            job.append(f"query = {json.dumps(query)}")
        path.write_text(path.read_text() + "\n".join(job) + "\n")
        return path

    def clear(self, pattern: str) -> None:
        client = self.redis()
        batch: list[str] = []
        for key in client.scan_iter(pattern, count=10_000):
            batch.append(key)
            if len(batch) >= 5000:
                client.delete(*batch)
                batch = []
        if batch:
            client.delete(*batch)
        client.close()


def warm_command(config: Path) -> float:
    """Seconds for `cachewarden warm all` (its process start included); fails loudly."""
    env = {**os.environ, "CACHEWARDEN_CONFIG": str(config)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "cachewarden.operator.cli", "warm", "all"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"cachewarden warm failed ({done.returncode}):\n{done.stderr[-3000:]}")
    say(done.stderr.strip().splitlines()[-1])
    return elapsed


def stream_into_redis(
    env: WarmEnv, prefix: str, tail: str = "", pipelined: bool = True
) -> tuple[int, float]:
    """The plain script: `SELECT * FROM the table <tail>` through a named cursor into
    `SET key json PX ttl`, pipelined per 5,000 rows (the raw limit) or one round trip
    per row (the naive loop). (rows, seconds)."""
    client = env.redis()
    started = time.perf_counter()
    rows = 0
    with env.pg(autocommit=False) as conn:
        cursor = conn.cursor(name="warm_raw")
        cursor.itersize = 10_000
        cursor.execute(f"SELECT * FROM {TABLE} {tail}")
        columns = [d.name for d in cursor.description or ()]
        target = client.pipeline(transaction=False) if pipelined else client
        for row in cursor:
            value = json.dumps(dict(zip(columns, row, strict=True)))
            target.set(f"{prefix}{row[0]}", value, px=TTL_MS)
            rows += 1
            if pipelined and rows % PIPELINE_ROWS == 0:
                target.execute()
        if pipelined:
            target.execute()
        cursor.close()
    elapsed = time.perf_counter() - started
    client.close()
    return rows, elapsed


def _raw_part(env: WarmEnv, prefix: str, where: str, out: Any) -> None:
    out.put(stream_into_redis(env, prefix, where)[0])


def raw_limit_parallel(env: WarmEnv, prefix: str, procs: int) -> tuple[int, float]:
    """The plain script in `procs` processes, each on its own id range. (rows, seconds)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    step = -(-env.args.rows // procs)
    started = time.perf_counter()
    children = [
        ctx.Process(
            target=_raw_part,
            args=(env, prefix, f"WHERE id > {n * step} AND id <= {(n + 1) * step}", out),
        )
        for n in range(procs)
    ]
    for child in children:
        child.start()
    rows = sum(out.get(timeout=600) for _ in children)
    for child in children:
        child.join(60)
    return rows, time.perf_counter() - started


def worker_peak_kb(worker: Worker) -> tuple[int, int]:
    """(the largest VmHWM of the worker's pool processes, the main process's), in KiB."""
    assert worker.proc is not None
    main = worker.proc.pid
    out = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True)
    children = [int(p) for p in out.stdout.split()]

    def hwm(pid: int) -> int:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    return max((hwm(p) for p in children), default=0), hwm(main)


def phase_speed(env: WarmEnv) -> dict[str, Any]:
    args = env.args
    config = env.warm_config("speed")
    worker = env.worker(config, "speed-worker.log")
    entries = f"{env.base}-speed:row:*"
    ours = raw = raw2 = 0.0
    raw_rows = raw2_rows = 0
    for n in range(args.rounds):
        env.clear(entries)
        seconds = warm_command(config)
        ours += seconds
        say(f"round {n + 1}: cachewarden {args.rows / seconds:,.0f} keys/s ({seconds:.2f} s)")
        rows, seconds = stream_into_redis(env, f"{env.base}-raw:")
        raw_rows += rows
        raw += seconds
        say(f"round {n + 1}: raw limit {rows / seconds:,.0f} keys/s ({seconds:.2f} s)")
        env.clear(f"{env.base}-raw:*")
        rows, seconds = raw_limit_parallel(env, f"{env.base}-raw:", args.concurrency)
        raw2_rows += rows
        raw2 += seconds
        say(f"round {n + 1}: raw limit x{args.concurrency} {rows / seconds:,.0f} keys/s")
        env.clear(f"{env.base}-raw:*")
    client = env.redis()
    cached = sum(1 for _ in client.scan_iter(entries, count=10_000))
    client.close()
    worker.stop()
    return {
        "ours": args.rows * args.rounds / ours,
        "raw": raw_rows / raw,
        "raw_parallel": raw2_rows / raw2,
        "cached": cached,
    }


def phase_naive(env: WarmEnv) -> float:
    limit = f"ORDER BY id LIMIT {env.args.naive_rows}"
    rows, seconds = stream_into_redis(env, f"{env.base}-naive:", limit, pipelined=False)
    env.clear(f"{env.base}-naive:*")
    return rows / seconds


def phase_memory(env: WarmEnv) -> dict[str, tuple[int, int]]:
    """A fresh worker per size: its processes' peak memory after warming that many rows."""
    out = {}
    for name, rows in (("small", 100_000), ("large", env.args.rows)):
        query = f"SELECT * FROM {TABLE} WHERE id <= {rows}"
        config = env.warm_config(f"mem{name}", query)
        worker = env.worker(config, f"mem-{name}.log")
        warm_command(config)
        out[name] = worker_peak_kb(worker)
        worker.stop()
        env.clear(f"{env.base}-mem{name}:*")
        say(f"memory at {rows:,} rows: pool {out[name][0] / 1024:.0f} MiB")
    return out


def body(env: Any) -> bool:
    args = env.args
    speed = run_phase("speed", lambda: phase_speed(env)) if "speed" in args.phases else None
    naive = run_phase("naive", lambda: phase_naive(env)) if "naive" in args.phases else None
    memory = run_phase("memory", lambda: phase_memory(env)) if "memory" in args.phases else None
    print(f"load average at end: {loadavg()}")
    print()
    rows: list[list[str]] = [["measure", "cachewarden", "baseline (same run)", "target", "verdict"]]
    results: list[bool | None] = []
    if speed is not None:
        share = speed["ours"] / speed["raw"]
        ok = share >= TARGET_RAW_SHARE and speed["cached"] == args.rows
        results.append(ok)
        rows.append(
            [
                f"keys warmed/s, {args.rows:,} rows, CLI start included (pooled, {args.rounds} rounds)",
                f"{speed['ours']:,.0f}",
                f"raw limit {speed['raw']:,.0f} (named cursor + pipelined SET)",
                f">= {TARGET_RAW_SHARE:.0%} of raw: {share:.0%}",
                verdict(ok),
            ]
        )
        rows.append(
            [
                "  context: the raw limit in as many processes as the worker has",
                "",
                f"{args.concurrency} processes, one id range each: {speed['raw_parallel']:,.0f}",
                f"{speed['ours'] / speed['raw_parallel']:.0%} of it",
                "",
            ]
        )
        if naive is not None:
            ratio = speed["ours"] / naive
            ok = ratio >= TARGET_NAIVE_RATIO
            results.append(ok)
            rows.append(
                [
                    "keys warmed/s vs the naive loop",
                    f"{speed['ours']:,.0f}",
                    f"one SET per row {naive:,.0f} (first {args.naive_rows:,} rows)",
                    f">= {TARGET_NAIVE_RATIO:.0f}x: {ratio:.1f}x",
                    verdict(ok),
                ]
            )
        rows.append(["keys in the cache after the last round", f"{speed['cached']:,}", "", "", ""])
    if memory is not None:
        small, large = memory["small"][0], memory["large"][0]
        growth = large / small - 1
        ok = growth <= TARGET_MEMORY_GROWTH
        results.append(ok)
        rows.append(
            [
                f"worker peak RSS (largest pool process), {args.rows:,} rows",
                f"{large / 1024:.0f} MiB",
                f"at 100,000 rows: {small / 1024:.0f} MiB "
                f"(main process {memory['large'][1] / 1024:.0f} MiB)",
                f"<= +{TARGET_MEMORY_GROWTH:.0%}: {growth:+.0%}",
                verdict(ok),
            ]
        )
    print(render(rows))
    print()
    print(f"worker: {args.concurrency} processes; chunk_size 5,000; entries are the rows' JSON")
    return all(r is not False for r in results)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--rows", type=int, default=1_000_000, help="rows in the table (default 1000000)"
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of each system (default 3)")
    p.add_argument(
        "--naive-rows", type=int, default=50_000, help="rows the naive loop times (default 50000)"
    )
    add_common_args(p, redis_db=11, phases=PHASES)
    args = p.parse_args(argv)
    parse_phases(p, args, PHASES)
    if args.rows < 100_000:
        p.error("--rows must be at least 100000 (the memory phase compares with 100,000)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run("cachewarden warming benchmark", "ops/bench/warming.py", lambda: WarmEnv(args), body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
