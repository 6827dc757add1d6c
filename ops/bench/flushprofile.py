"""Where a flushed row's CPU goes: an in-process drain, stage by stage.

Not a benchmark against a baseline (writebehind.py is that): a profile for working on
the flusher. Each run buffers `--writes` writes with Cache.write() (not timed), then
drains every shard in this process with flush_shard(), the core the Celery task calls,
and reports per row:

- Python CPU (`time.process_time`) and wall time of the drain;
- the garbage collector's time (`gc.callbacks`) and its collections by generation, at
  `--gc-threshold` (the worker's 10,000 by default; 0 for Python's own 700) with the
  heap inherited before the drain frozen, as worker processes do;
- Redis's CPU (`INFO cpu`) and each command's time (`INFO commandstats`: a script's
  inner commands are counted under their own names and inside `evalsha`);
- with `--stages`, the CPU (`time.thread_time`) spent in each stage of the flush,
  timed per call around the flusher's functions (per batch, not per row, so the
  timing itself costs little).

    .venv/bin/python ops/bench/flushprofile.py                 # 3 runs of 100,000 writes
    .venv/bin/python ops/bench/flushprofile.py --stages --runs 1
    .venv/bin/python ops/bench/flushprofile.py --redis-models --writes 250000

It uses writebehind.py's environment: a fresh PostgreSQL schema and Redis prefix per
run, removed at the end. Two checkouts (before and after a change) can alternate their
runs with `--take-turns FILE:NAME:ORDER`, as writebehind.py's rounds do.

`--redis-models` measures Redis alone under hypothetical models of the buffer, whatever
the checkout's code: "group" is the consumer group (XREADGROUP, XACK) the buffer used
before issue 18, "cursor" the XRANGE cursor that replaced it (what finish.lua does per
key today), "kept" and "trim" models not built.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, writebehind.py

from common import MISSING, loadavg, say
from writebehind import ENTITY, Rounds, WriteEnv, code_version, enqueue
from writebehind import parse_args as bench_args

if MISSING is None:
    import psycopg
    import redis
    import structlog

    import cachewarden.scripts as scripts
    import cachewarden.writebehind.fence as fence
    import cachewarden.writebehind.flush as flush
    import cachewarden.writebehind.pgcopy as pgcopy
    import cachewarden.writebehind.sink as sink
    from cachewarden.context import Context
    from cachewarden.settings import load_settings


class Stages:
    """CPU seconds per stage, from wrappers put around the flusher's functions."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.labels: list[str] = []  # in the order installed: the report's order
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.thread_time() - start

        setattr(owner, name, timed)
        if label not in self.labels:
            self.labels.append(label)
        self._undo.append(lambda: setattr(owner, name, original))

    def install(self) -> None:
        """The stages: each label says what it covers (nested ones are inside others)."""
        self.wrap(flush.ShardFlusher, "_drain", "drain: everything below")
        self.wrap(scripts.InFlight, "reply", "stream and script replies: read, parse")
        self.wrap(flush, "_batch", "operations built from the stream reply")
        self.wrap(flush.ShardFlusher, "_apply", "apply: coalesce + SQL transaction")
        self.wrap(sink.SqlSink, "_transaction", "  SQL transaction, all of it")
        self.wrap(sink.SqlSink, "_plan", "    rows: JSON decode, columns, keys")
        self.wrap(pgcopy.CopyMerge, "apply", "    COPY + merge")
        self.wrap(pgcopy, "_dumpable", "      values check")
        self.wrap(psycopg.Cursor, "execute", "      statements (psycopg execute)")
        self.wrap(sink.SqlSink, "_wait_for_locks", "    lock_timeout")
        self.wrap(fence.Fence, "check", "    fence check")
        self.wrap(psycopg.Connection, "commit", "    commit")
        self.wrap(flush.ShardFlusher, "_finish", "finish.lua: arguments, send")
        self.wrap(flush.ShardFlusher, "_settle", "finish.lua: read its reply, count")

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


class GcClock:
    """The garbage collector's time and collections, from gc.callbacks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1


def redis_cpu(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def command_usec(client: redis.Redis) -> dict[str, float]:
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): float(v["usec"]) for name, v in stats.items()}


def one_run(args: argparse.Namespace, stages: Stages | None) -> dict[str, float]:
    """Buffer, then drain in this process; the per-row figures of the drain."""
    bench = bench_args(["--shards", str(args.shards), "--pg-url", args.pg_url])
    bench.redis_url = args.redis_url
    env = WriteEnv(bench)
    env.setup()
    try:
        env.table("profiled")
        config = env.wb_config("profile", "profiled", max_pending=args.writes + 10_000)
        say(f"buffering {args.writes:,} writes (not timed)")
        enqueue(config, args.writes, args.writes, 2)
        client = env.redis()
        context = Context.build(load_settings(str(config)))
        client.delete(context.keys.due())  # no worker runs; nothing else flushes
        flush.sink_for(context, ENTITY)  # reflect the table outside the clock
        gc.collect()
        gc.freeze()
        gc.set_threshold(args.gc_threshold or 700)
        clock = GcClock()
        gc.callbacks.append(clock)
        if stages is not None:
            stages.seconds.clear()
            stages.install()
        cpu0, usec0 = redis_cpu(client), command_usec(client)
        wall0, py0 = time.perf_counter(), time.process_time()
        rows = 0
        try:
            for shard in range(args.shards):
                while (done := flush.flush_shard(context, ENTITY, shard, 600_000).entries) > 0:
                    rows += done
        finally:
            py1, wall1 = time.process_time(), time.perf_counter()
            gc.callbacks.remove(clock)
            if stages is not None:
                stages.uninstall()
        cpu1, usec1 = redis_cpu(client), command_usec(client)
        if rows != args.writes:
            raise RuntimeError(f"drained {rows:,} entries, expected {args.writes:,}")
        per_row = 1e6 / rows
        out = {
            "Python CPU": (py1 - py0) * per_row,
            "wall": (wall1 - wall0) * per_row,
            "GC": clock.seconds * per_row,
            "GC collections per 1,000,000 rows": sum(clock.collections) * 1e6 / rows,
            "Redis CPU": (cpu1 - cpu0) * per_row,
        }
        for name, usec in usec1.items():
            spent = (usec - usec0.get(name, 0.0)) / rows
            if spent >= 0.01:
                out[f"redis {name}"] = spent
        if stages is not None:
            for label in stages.labels:
                out[f"stage {label}"] = stages.seconds[label] * per_row
        context.close()
        client.close()
        return out
    finally:
        env.cleanup()


# What finish.lua does per key under each model of the buffer, and no more: the
# acknowledgement (group only), the trim, the dirty hash's HMGET and HDEL, and the TTL
# given back (not where pending entries keep theirs; none of it for "trim").
SETTLE = """
-- KEYS: 1 stream, 2 dirty hash, then the cache entry of each key
-- ARGV: 1 model, 2 group, 3 the batch's last id, 4 ttl_ms, 5 n, then n ids, then n keys
local model, n = ARGV[1], tonumber(ARGV[5])
local first_key = 6 + n
if model == 'group' then
  redis.call('XACK', KEYS[1], ARGV[2], unpack(ARGV, 6, 5 + n))
end
local ms, seq = string.match(ARGV[3], '^(%d+)-(%d+)$')
redis.call('XTRIM', KEYS[1], 'MINID', ms .. '-' .. (tonumber(seq) + 1))
if model == 'trim' then return n end
local newest = redis.call('HMGET', KEYS[2], unpack(ARGV, first_key, first_key + n - 1))
local clock = redis.call('TIME')
local expire_at = tostring(tonumber(clock[1]) * 1000 + tonumber(ARGV[4]))
local done = {}
for i = 1, n do
  if newest[i] == ARGV[5 + i] then
    done[#done + 1] = ARGV[first_key + i - 1]
    if model ~= 'kept' then redis.call('PEXPIREAT', KEYS[2 + i], expire_at) end
  end
end
redis.call('HDEL', KEYS[2], unpack(done))
return #done
"""

REDIS_MODELS = {
    "group": "consumer group (before issue 18), no TTL pending",
    "cursor": "XRANGE cursor (issue 18, today), no TTL pending",
    "kept": "XRANGE cursor, pending entries keep their TTL",
    "trim": "XRANGE cursor and trim only (no dirty hash)",
}


def _buffer(client: redis.Redis, prefix: str, writes: int, model: str) -> None:
    """`writes` pending writes shaped as enqueue.lua leaves them: a stream entry, the
    dirty hash's key -> id, and the cache entry (with its TTL only where pending entries
    keep theirs)."""
    ttl = None if model in ("group", "cursor") else 600_000
    for first in range(0, writes, 5000):
        keys = range(first, min(first + 5000, writes))
        pipe = client.pipeline(transaction=False)
        values = {}
        for k in keys:
            values[k] = f'{{"id":{k},"name":"name-{k}","score":{k % 1000},"version":3}}'
            pipe.xadd(f"{prefix}:s", {"o": "w", "k": str(k), "v": values[k], "n": "3"})
        ids = pipe.execute()
        for k, sid in zip(keys, ids, strict=True):
            pipe.hset(f"{prefix}:d", str(k), sid)
            pipe.set(f"{prefix}:e:{k}", values[k], px=ttl)
        pipe.execute()
    if model == "group":
        client.xgroup_create(f"{prefix}:s", "g", id="0")


def _drop(client: redis.Redis, prefix: str) -> None:
    """Delete every key under `prefix`."""
    names = list(client.scan_iter(f"{prefix}:*", count=10_000))
    for first in range(0, len(names), 10_000):
        client.delete(*names[first : first + 10_000])


def redis_models(args: argparse.Namespace) -> None:
    """Redis's own CPU per flushed entry under four models of the write buffer, each key
    written once, in batches of 1,000: the read (XREADGROUP, or XRANGE from the last id
    read) and one script per batch doing what finish.lua does per key in that model."""
    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    settle = client.register_script(SETTLE)
    totals: dict[str, dict[str, list[float]]] = {
        model: {"read": [], "settle": [], "cpu": []} for model in REDIS_MODELS
    }
    prefix = f"cwprofile-{time.time_ns()}"
    try:
        for _ in range(args.runs):
            for model, figures in totals.items():
                _buffer(client, prefix, args.writes, model)
                before, cpu0 = command_usec(client), redis_cpu(client)
                start = "-"
                while True:
                    entries: Any
                    if model == "group":
                        got: Any = client.xreadgroup("g", "c", {f"{prefix}:s": ">"}, count=1000)
                        entries = got[0][1] if got else []
                    else:
                        entries = client.xrange(f"{prefix}:s", min=start, count=1000)
                    if not entries:
                        break
                    last = entries[-1][0]
                    ms, seq = last.split("-")
                    start = f"{ms}-{int(seq) + 1}"
                    ids = [sid for sid, _ in entries]
                    keys = [fields["k"] for _, fields in entries]
                    settle(
                        keys=[f"{prefix}:s", f"{prefix}:d"] + [f"{prefix}:e:{k}" for k in keys],
                        args=[model, "g", last, 600_000, len(ids), *ids, *keys],
                    )
                after, cpu1 = command_usec(client), redis_cpu(client)
                command = "xreadgroup" if model == "group" else "xrange"
                spent = after[command] - before.get(command, 0.0)
                figures["read"].append(spent / args.writes)
                spent = after["evalsha"] - before.get("evalsha", 0.0)
                figures["settle"].append(spent / args.writes)
                figures["cpu"].append((cpu1 - cpu0) * 1e6 / args.writes)
                _drop(client, prefix)
    finally:
        _drop(client, prefix)
        client.close()
    print(
        f"Redis's CPU per flushed entry, {args.writes:,} entries, batches of 1,000, "
        f"{args.runs} runs (us):"
    )
    print(f"{'model':48s} {'read':>6s} {'settle':>7s} {'CPU':>6s}")
    for model, figures in totals.items():
        read, spent, cpu = (statistics.mean(figures[n]) for n in ("read", "settle", "cpu"))
        runs = "/".join(f"{v:.2f}" for v in figures["cpu"])
        print(
            f"{REDIS_MODELS[model]:48s} {read:6.2f} {spent:7.2f} {cpu:6.2f}   (CPU per run {runs})"
        )
    print("(read, settle: the commands' own time; CPU: INFO cpu, the parsing and replies included)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--writes", type=int, default=100_000, help="per run (default 100000)")
    p.add_argument("--runs", type=int, default=3, help="default 3")
    p.add_argument("--shards", type=int, default=2, help="default 2")
    p.add_argument(
        "--gc-threshold",
        type=int,
        default=10_000,
        help="the youngest generation's threshold during the drain (default 10000, as "
        "worker processes; 0: Python's 700)",
    )
    p.add_argument("--stages", action="store_true", help="time each stage of the flush")
    p.add_argument(
        "--redis-models",
        action="store_true",
        help="instead: Redis's CPU per flushed entry under four models of the buffer, "
        "whatever this checkout's code: 'group' is the consumer group used before issue 18 "
        "(XREADGROUP + XACK), 'cursor' today's XRANGE cursor (TTL restored per key), "
        "'kept' a cursor whose pending entries keep their TTL, 'trim' read and trim only",
    )
    p.add_argument(
        "--take-turns",
        default="",
        metavar="FILE:NAME:ORDER",
        help="alternate the runs with another checkout's (see writebehind.py --help)",
    )
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    p.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if MISSING is not None:
        print(f"missing dependency: {MISSING}; run `make .venv/bin/cachewarden` first")
        return 2
    # One log line per batch would time the terminal: warnings and errors only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.redis_models:
        redis_models(args)
        return 0
    stages = Stages() if args.stages else None
    try:
        rounds = Rounds(args.take_turns)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"load average at start: {loadavg()}; versions: {code_version().lstrip(', ')}")
    runs = []
    try:
        for n in range(args.runs):
            say(f"run {n + 1} of {args.runs}")
            with rounds.round(f"run {n + 1}"):
                runs.append(one_run(args, stages))
    finally:
        rounds.close()
    rounds.print()
    print(f"in-process drain of {args.writes:,} writes, {args.shards} shards, per row (us):")
    print(f"{'measure':48s} " + " ".join(f"{f'run {n + 1}':>8s}" for n in range(len(runs))))
    names = list(dict.fromkeys(name for run in runs for name in run))
    commands = sorted(
        (name for name in names if name.startswith("redis ")),
        key=lambda name: -sum(run.get(name, 0.0) for run in runs),
    )
    names = [n for n in names if not n.startswith(("redis ", "stage "))] + commands
    names += [n for n in runs[0] if n.startswith("stage ")]
    for name in names:
        values = [run.get(name, 0.0) for run in runs]
        cells = " ".join(f"{v:8.2f}" for v in values)
        print(f"{name:48s} {cells}   mean {statistics.mean(values):.2f}")
    print("(GC collections: a count; redis <command>: that command's own time in Redis)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
