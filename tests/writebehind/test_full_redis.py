"""A full Redis never wedges the write path: writes stop short of maxmemory and the buffer drains."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cachewarden.errors import Backpressure
from tests.conftest import Harness
from tests.helpers import wait_for
from tests.servers import PrivateRedis

USER = {"table": "users", "key": "id", "ttl": "10m"}
BIO = "x" * 1000


@pytest.fixture
def small_redis() -> Iterator[PrivateRedis]:
    """A private Redis with maxmemory 30mb and noeviction."""
    with PrivateRedis(maxmemory="30mb", **{"maxmemory-policy": "noeviction"}) as server:
        yield server


@pytest.fixture
def other_redis() -> Iterator[PrivateRedis]:
    """A second private Redis, for the broker."""
    with PrivateRedis() as server:
        yield server


def _fill(h: Harness) -> set[int]:
    """Write 1 KB rows until Redis refuses them; return the keys taken."""
    taken: set[int] = set()
    refused: list[BaseException] = []
    key = 0
    while not refused:
        batch = {key + i: {"name": "n", "bio": BIO} for i in range(500)}
        key += 500
        result = h.cache.write_many("user", batch)
        taken |= {int(k) for k in result.taken}
        refused = list(result.refused.values())
    assert all(isinstance(e, Backpressure) and "maxmemory" in str(e) for e in refused), refused[0]
    return taken


@pytest.mark.parametrize("broker", ["same", "other"])
def test_a_full_redis_drains_and_takes_writes_again(
    pg_harness: Harness, small_redis: PrivateRedis, other_redis: PrivateRedis, broker: str
) -> None:
    """Writes filling a 30 MB Redis are refused with Backpressure naming memory; a worker started then (its broker on that Redis or another) lands every taken write within 60 s, and writes are taken again."""
    h = pg_harness
    h.create_table("users", version=False, extra="bio TEXT")
    h.configure({"user": USER}, {"user": {"max_delay": "100ms"}}, redis_url=small_redis.url)
    taken = _fill(h)
    assert len(taken) > 5_000  # about 2.5 KB each in Redis: entry, stream entry, dirty field
    with pytest.raises(Backpressure, match="maxmemory"):
        h.cache.write("user", 10**9, {"name": "one more"})
    env = {} if broker == "same" else {"CACHEWARDEN_BROKER_URL": other_redis.url}
    h.worker(concurrency=2, **env)
    wait_for(lambda: h.count("users") >= len(taken), 60, interval=0.5, what="the drain")
    assert set(h.rows("users")) == taken
    wait_for(lambda: _taken(h), 10, what="writes to be taken again")


def _taken(h: Harness) -> bool:
    try:
        return bool(h.cache.write("user", 10**9, {"name": "again"}))
    except Backpressure:
        return False
