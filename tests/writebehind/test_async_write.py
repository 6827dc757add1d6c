"""AsyncCache's writes against real Redis and PostgreSQL: the same write buffer as
Cache's, flushed by the same flusher, and never sent twice."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import pytest

from cachewarden import AsyncCache
from cachewarden.errors import BackendUnavailable
from cachewarden.writebehind.flush import flush_shard
from tests.conftest import Harness
from tests.helpers import REDIS_URL
from tests.proxy import CuttingProxy

SHARDS = 2
USER = {"table": "users", "key": "id", "ttl": "10m", "version_column": "version"}


def _flush_all(h: Harness) -> None:
    for shard in range(SHARDS):
        result = flush_shard(h.context, "user", shard)
        assert result.status == "done", result.errors


def test_async_writes_are_flushed_and_read_by_a_sync_cache_and_back(pg_harness: Harness) -> None:
    """Writes and deletes made by AsyncCache are flushed by the in-process flusher and read back by a sync Cache, and a sync Cache's writes are read back by AsyncCache."""
    h = pg_harness
    h.create_table("users")
    h.configure({"user": USER}, {"user": {"shards": SHARDS, "max_delay": "1h"}})

    async def write() -> None:
        async with AsyncCache(h.settings) as cache:
            assert await cache.write("user", 1, {"name": "one", "version": 1})
            done = await cache.write_many(
                "user", {2: {"name": "two", "version": 1}, 3: {"name": "three", "version": 1}}
            )
            assert done.ok and sorted(done.taken) == ["2", "3"]
            assert await cache.delete("user", 3, version=2)

    asyncio.run(write())
    _flush_all(h)
    rows = h.rows("users")
    assert {k: r["name"] for k, r in rows.items()} == {1: "one", 2: "two"}
    assert h.cache.get("user", 1) == {"id": 1, "name": "one", "version": 1}
    assert h.cache.get("user", 3) is None

    h.cache.write("user", 4, {"name": "four", "version": 1})
    h.cache.write("user", 1, {"name": "uno", "version": 2})

    async def read() -> list[object]:
        async with AsyncCache(h.settings) as cache:
            return [await cache.get("user", 1), *(await cache.get_many("user", [2, 3, 4]))]

    assert asyncio.run(read()) == [
        {"id": 1, "name": "uno", "version": 2},
        {"id": 2, "name": "two", "version": 1},
        None,
        {"id": 4, "name": "four", "version": 1},
    ]
    _flush_all(h)
    assert h.rows("users")[1]["name"] == "uno" and h.rows("users")[4]["name"] == "four"


def test_an_async_write_whose_reply_is_lost_is_never_sent_twice(pg_harness: Harness) -> None:
    """When the connection breaks after Redis ran an async write's enqueue script and before its reply came back, write() raises BackendUnavailable saying the write may be buffered, and the stream holds that write once."""
    h = pg_harness
    h.create_table("users", version=False)
    url = urlparse(REDIS_URL)
    db = int(url.path.lstrip("/") or 0)
    with CuttingProxy(url.port or 6379, b"EVALSHA", cuts=0) as proxy:
        h.configure(
            {"user": {"table": "users", "key": "id", "ttl": "10m"}},
            {"user": {"shards": 1, "max_delay": "1h"}},
            redis_url=proxy.url(db),
        )

        async def main() -> str:
            async with AsyncCache(h.settings) as cache:
                assert await cache.write("user", 1, {"name": "first"})
                proxy.arm(1)
                with pytest.raises(BackendUnavailable, match="may or may not be buffered") as info:
                    await cache.write("user", 2, {"name": "second"})
                assert await cache.write("user", 3, {"name": "third"})  # the next goes through
                return str(info.value)

        message = asyncio.run(main())
        assert proxy.cut == 1
        assert "writing it again is safe" in message
        stream = h.context.keys.stream("user", 0)
        assert [f["k"] for _, f in h.context.redis.xrange(stream)] == ["1", "2", "3"]
