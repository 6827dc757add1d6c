"""What a partial write costs `write()`: a full-row write against a write of some of
the row's columns (merged into the cached row by enqueue.lua), and the full-row write
of the code before partial writes existed (op "w" with no column check), in
interleaved rounds of one run.

    .venv/bin/python ops/bench/partialwrite.py [--writes 20000] [--rounds 3]

SQLite in a temporary folder holds the table (only reflected: nothing is flushed);
Redis is --redis-url (a fresh prefix, deleted afterwards).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import redis
import sqlalchemy as sa

from cachewarden import Cache
from cachewarden.settings import load_settings
from cachewarden.writebehind.enqueue import enqueue, write_op, write_scripts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args()
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.db"
        engine = sa.create_engine(f"sqlite:///{db}")
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE users (id INTEGER PRIMARY KEY, name VARCHAR(200), "
                "email VARCHAR(200), city VARCHAR(200), version BIGINT)"
            )
        config = Path(tmp) / "cachewarden.toml"
        config.write_text(
            f'[redis]\nurl = "{args.redis_url}"\nprefix = "{prefix}"\n'
            f'[database]\nurl = "sqlite:///{db}"\n'
            '[entities.user]\ntable = "users"\nkey = "id"\nttl = "10m"\n'
            '[entities.user.write_behind]\nshards = 4\nmax_pending = 10000000\nmax_delay = "1h"\n'
        )
        cache = Cache(load_settings(config))
        full = {"name": "Ada Lovelace", "email": "ada@example.com", "city": "London", "version": 1}
        keys = range(args.writes)
        cache.write_many("user", {k: full for k in keys})  # a full row cached for each key
        scripts = write_scripts(cache.context, "user")
        columns = cache.context.columns("user")
        assert columns is not None
        spec, partial = scripts.spec, {"email": "ada@new.example.com"}

        # The three arms take the same path as Cache.write (write_op, then enqueue's
        # round trip); only the row and the column check differ.
        def full_rows() -> None:
            for k in keys:
                enqueue(scripts, [write_op(spec, k, full, str(k), columns)])

        def partial_rows() -> None:
            for k in keys:
                enqueue(scripts, [write_op(spec, k, partial, str(k), columns)])

        def before() -> None:  # no column check: op "w" always, as before partial writes
            for k in keys:
                enqueue(scripts, [write_op(spec, k, full, str(k))])

        arms = {"full row": full_rows, "partial (merge)": partial_rows, "full, no check": before}
        times: dict[str, list[float]] = {name: [] for name in arms}
        order = list(arms)
        for n in range(args.rounds):
            for name in order[n % 3 :] + order[: n % 3]:  # each arm first in turn
                arm = arms[name]
                started = time.perf_counter()
                arm()
                times[name].append((time.perf_counter() - started) / args.writes * 1e6)
        base = statistics.mean(times["full, no check"])
        print(f"write() cost, us per call, {args.rounds} interleaved rounds of {args.writes:,}:")
        for name, values in times.items():
            mean = statistics.mean(values)
            rounds = " / ".join(f"{v:.1f}" for v in values)
            print(f"  {name:18s} {mean:7.1f}  ({rounds})  {mean / base:.2f}x")
        cache.close()
        client = redis.Redis.from_url(args.redis_url)
        for key in client.scan_iter(f"{prefix}:*", count=10_000):
            client.delete(key)


if __name__ == "__main__":
    main()
