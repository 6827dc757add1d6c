"""AsyncCache's read path against real Redis and PostgreSQL: single flight across
coroutines, loads off the event loop, and the errors `Cache` raises.

The slow loader is test_reader's: a PostgreSQL function that counts its calls in a
sequence and sleeps as long as the `loader_delay` table says.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import pytest

from cachewarden import AsyncCache
from cachewarden.errors import BackendUnavailable, InvalidKey, InvalidValue, UnknownEntity
from tests.conftest import Harness
from tests.readpath.test_reader import LOADER, loader_calls, set_loader, setup_users
from tests.servers import free_port

KEYS = 100
READERS_PER_KEY = 10
WARM = 4  # the loader threads (AsyncCache's LOADER_THREADS)


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    """Sleep 1 ms at a time and record how late each wake-up came (the loop's lag)."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - start - 0.001)


def test_a_stampede_of_coroutines_loads_each_key_once_without_stalling_the_loop(
    pg_harness: Harness,
) -> None:
    """1,000 concurrent get()s of 100 cold keys with a 200 ms loader load each key once, every reader gets its row, and the event loop never lags more than 20 ms."""
    h = pg_harness
    setup_users(h, rows=KEYS + WARM, loader=LOADER)

    async def main() -> tuple[list[Any], list[float], int]:
        async with AsyncCache(h.settings) as cache:
            # A warm process: reflection, scripts and each loader thread's database
            # connection ready (loads overlapping, so that each thread opens its own).
            set_loader(h, seconds=0.05)
            warm = [cache.get("user", KEYS + 1 + n) for n in range(WARM)]
            assert all(await asyncio.gather(*warm))
            set_loader(h, seconds=0.2)
            before = loader_calls(h)
            # What is measured is what the cache does to the loop, not the collector's
            # full passes over pytest's heap (one takes ~50 ms here, cachewarden or not).
            gc.collect()
            gc.freeze()
            lags: list[float] = []
            stop = asyncio.Event()
            ticker = asyncio.create_task(_ticker(lags, stop))
            await asyncio.sleep(0.01)
            readers = [
                asyncio.create_task(cache.get("user", 1 + n % KEYS))
                for n in range(KEYS * READERS_PER_KEY)
            ]
            rows = await asyncio.gather(*readers)
            stop.set()
            await ticker
            gc.unfreeze()
            return rows, lags, before

    rows, lags, before = asyncio.run(main())
    assert loader_calls(h) - before == KEYS
    assert [row["name"] if row else None for row in rows] == [
        f"v1-{1 + n % KEYS}" for n in range(KEYS * READERS_PER_KEY)
    ]
    assert max(lags) <= 0.020, f"the loop lagged {max(lags) * 1000:.1f} ms"


def test_get_many_loads_its_misses_once_and_serves_hits_from_the_cache(pg_harness: Harness) -> None:
    """get_many returns rows in order (None for an absent key), loading each missed key once in one SELECT and serving a repeat from the cache."""
    h = pg_harness
    setup_users(h, rows=10)

    async def main() -> tuple[list[Any], list[Any], dict[str, int]]:
        async with AsyncCache(h.settings) as cache:
            first = await cache.get_many("user", [3, 1, 999, 3])
            again = await cache.get_many("user", [1, 3, 999])
            return first, again, cache.reader.stats.snapshot()

    first, again, stats = asyncio.run(main())
    assert [r["name"] if r else None for r in first] == ["v1-3", "v1-1", None, "v1-3"]
    assert [r["name"] if r else None for r in again] == ["v1-1", "v1-3", None]
    assert stats["loads"] == 3 and stats["hits"] == 3


def test_errors_are_cache_errors(pg_harness: Harness) -> None:
    """An unknown entity raises UnknownEntity, a bad key InvalidKey, an unencodable row InvalidValue, as Cache does, before anything is sent."""
    h = pg_harness
    setup_users(h, rows=1)

    async def main() -> None:
        async with AsyncCache(h.settings) as cache:
            with pytest.raises(UnknownEntity, match="nobody"):
                await cache.get("nobody", 1)
            with pytest.raises(UnknownEntity, match="nobody"):
                await cache.write("nobody", 1, {"name": "x"})
            with pytest.raises(InvalidKey):
                await cache.get("user", "")
            with pytest.raises(InvalidKey):
                await cache.write("user", "", {"name": "x"})
            with pytest.raises(InvalidValue):
                await cache.write("user", 1, {"name": complex(1, 2)})
            with pytest.raises(InvalidValue):
                await cache.write("user", 1, ["not", "a", "dict"])  # type: ignore[arg-type]

    asyncio.run(main())
    assert h.buffered() == 0


def test_redis_down_is_backend_unavailable(pg_harness: Harness) -> None:
    """With Redis unreachable (a closed port), get, get_many, write and delete raise BackendUnavailable naming the entity."""
    h = pg_harness
    setup_users(h, rows=1)
    h.configure(
        {"user": {"table": "users", "key": "id", "ttl": "10m"}},
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )

    async def main() -> list[str]:
        raised = []
        async with AsyncCache(h.settings) as cache:
            for call in (
                cache.get("user", 1),
                cache.get_many("user", [1, 2]),
                cache.write("user", 1, {"name": "x"}),
                cache.delete("user", 1),
            ):
                with pytest.raises(BackendUnavailable) as info:
                    await call
                raised.append(str(info.value))
        return raised

    for message in asyncio.run(main()):
        assert message.startswith("user")
