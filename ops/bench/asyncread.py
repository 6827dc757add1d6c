"""AsyncCache hit latency next to a plain redis.asyncio GET and a sync Cache hit.

Target: an AsyncCache hit costs at most 1.2x a plain redis.asyncio GET of the same
entry at p50, measured in the same run. Not a pytest test: run it by hand.

    .venv/bin/python ops/bench/asyncread.py                 # 20,000 reads of each kind
    .venv/bin/python ops/bench/asyncread.py --reads 5000    # a quicker look

The three kinds run in interleaved rounds (so a neighbour's load hits all alike), one
read at a time from one coroutine or thread, against 1,000 cached rows of a SQLite
table (a hit never reaches the database). Fresh Redis key prefix, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
import redis.asyncio
import sqlalchemy as sa

from cachewarden import AsyncCache, Cache
from cachewarden.settings import load_settings

ROWS = 1000
ROUNDS = 10


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def config(tmp: Path, redis_url: str, prefix: str) -> Path:
    db = tmp / "bench.db"
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, version INTEGER)")
        )
        conn.execute(
            sa.text("INSERT INTO users VALUES (:id, :name, 1)"),
            [{"id": n, "name": f"user-{n}"} for n in range(1, ROWS + 1)],
        )
    engine.dispose()
    path = tmp / "cachewarden.toml"
    path.write_text(
        f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n\n'
        f'[database]\nurl = "sqlite:///{db}"\n\n'
        '[entities.user]\ntable = "users"\nkey = "id"\nttl = "1h"\n'
    )
    return path


async def async_rounds(path: Path, reads: int, sync: Cache) -> dict[str, list[float]]:
    settings = load_settings(path)
    times: dict[str, list[float]] = {"AsyncCache.get": [], "redis.asyncio GET": [], "Cache.get": []}
    plain = redis.asyncio.Redis.from_url(settings.redis.url, decode_responses=True)
    entry = sync.keys.entry
    keys = [random.randint(1, ROWS) for _ in range(reads // ROUNDS)]
    async with AsyncCache(settings) as cache:
        for key in range(1, ROWS + 1):  # every row cached, connections open
            assert await cache.get("user", key)
            await plain.get(entry("user", str(key)))
            sync.get("user", key)
        clock = time.perf_counter
        for _ in range(ROUNDS):
            out = times["AsyncCache.get"]
            for key in keys:
                start = clock()
                await cache.get("user", key)
                out.append(clock() - start)
            out = times["redis.asyncio GET"]
            for key in keys:
                name = entry("user", str(key))  # (the cache builds its key names too)
                start = clock()
                await plain.get(name)
                out.append(clock() - start)
            out = times["Cache.get"]
            for key in keys:
                start = clock()
                sync.get("user", key)
                out.append(clock() - start)
    await plain.aclose()
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reads", type=int, default=20_000, help="reads of each kind")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    a = p.parse_args()
    prefix = f"bench-aio-{uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(a.redis_url)
    with tempfile.TemporaryDirectory() as tmp:
        path = config(Path(tmp), a.redis_url, prefix)
        try:
            with Cache(load_settings(path)) as sync:
                times = asyncio.run(async_rounds(path, a.reads, sync))
        finally:
            for found in admin.scan_iter(f"{prefix}:*", count=1000):
                admin.delete(found)
    base = percentile(times["redis.asyncio GET"], 0.5)
    print(f"{'reads of a cached row':22} {'p50 us':>8} {'p99 us':>8} {'p50 / GET':>10}")
    for kind, values in times.items():
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        print(f"{kind:22} {p50 * 1e6:8.1f} {p99 * 1e6:8.1f} {p50 / base:10.2f}")
    ratio = percentile(times["AsyncCache.get"], 0.5) / base
    print(
        f"target: AsyncCache.get p50 <= 1.2x redis.asyncio GET: {ratio:.2f}x "
        f"{'PASS' if ratio <= 1.2 else 'MISS'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
