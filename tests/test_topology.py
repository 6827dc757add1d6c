"""The private Sentinel topology (tests/topology.py) works, and what the clients do with it.

Besides the harness itself these check, on real servers, what Sentinel support
relies on: redis-py's sentinel pools follow a failover without being rebuilt
(sync, asyncio, and a blocking pool built from SentinelConnectionPool and
BlockingConnectionPool), both passwords reach the right servers, kombu's
`sentinel://` transport carries a message, and what WAIT / WAITAOF count.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from queue import LifoQueue
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.sentinel
from kombu import Connection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from cachewarden.aio.connections import AsyncBlockingSentinelPool, AsyncFollowingConnection
from cachewarden.connections import BlockingSentinelPool
from tests.topology import Binary, SentinelTopology, command


@pytest.fixture(scope="module")
def topology() -> Iterator[SentinelTopology]:
    """Redis 7.0 data nodes and sentinels, both password-protected (not to be failed over)."""
    with SentinelTopology("redis", password="data-pw", sentinel_password="sentinel-pw") as topo:
        yield topo


@pytest.fixture(scope="module")
def valkey_topology() -> Iterator[SentinelTopology]:
    """Valkey 9 data nodes with AOF (appendfsync everysec) and Valkey sentinels."""
    with SentinelTopology("valkey", appendonly=True) as topo:
        yield topo


@pytest.fixture(params=["redis", "valkey"])
def any_topology(
    request: pytest.FixtureRequest,
    topology: SentinelTopology,
    valkey_topology: SentinelTopology,
) -> SentinelTopology:
    return topology if request.param == "redis" else valkey_topology


def test_master_for_writes_on_the_primary_and_the_replica_gets_it(
    topology: SentinelTopology,
) -> None:
    """With passwords on the sentinels (sentinel_kwargs) and on the data nodes (password), a client from Sentinel.master_for writes on the primary and the write reaches the replica."""
    sentinel = topology.sentinel_client(decode_responses=True)
    client = sentinel.master_for(topology.service)
    try:
        assert sentinel.discover_master(topology.service) == topology.primary
        client.set("harness:write", "landed")
        topology.wait_caught_up()
        assert topology.client(topology.primary).get("harness:write") == "landed"
        assert topology.client(topology.replica).get("harness:write") == "landed"
    finally:
        client.close()
        sentinel.close()


def test_a_paused_replica_falls_behind_while_the_primary_takes_writes(
    any_topology: SentinelTopology,
) -> None:
    """With the replica SIGSTOPped the primary still takes writes, its acknowledged offset stays behind and `WAIT 1 100` after a write returns 0; resumed, it catches up and WAIT returns 1."""
    topo = any_topology
    client = redis.Redis.from_url(topo.primary_url, single_connection_client=True)
    try:
        with topo.paused(topo.replica):
            assert client.set("lag:key", "1")
            assert command(client, "WAIT", 1, 100) == 0
            master, acked = topo.replication_offsets()
            assert acked < master
        assert command(client, "WAIT", 1, 5000) == 1
        topo.wait_caught_up()
    finally:
        client.close()


def test_wait_after_a_write_covers_the_earlier_writes_of_other_connections(
    any_topology: SentinelTopology,
) -> None:
    """WAIT after a connection's own write counts the replica only once it has that write and every earlier write of other connections: 0 while the replica is paused, and when it returns 1 the replica holds the other connection's write."""
    topo = any_topology
    other = redis.Redis.from_url(topo.primary_url, single_connection_client=True)
    mine = redis.Redis.from_url(topo.primary_url, single_connection_client=True)
    mine.set("woff:mine", "before")
    try:
        with topo.paused(topo.replica):
            other.set("woff:other", "x" * 1000)
            other_offset, _ = topo.replication_offsets()
            mine.set("woff:mine", "y")
            assert command(mine, "WAIT", 1, 100) == 0
        assert command(mine, "WAIT", 1, 5000) == 1
        assert topo.replication_offsets()[1] >= other_offset
        assert topo.client(topo.replica).get("woff:other") == "x" * 1000
    finally:
        other.close()
        mine.close()


@pytest.mark.parametrize("binary", ["redis", "valkey"])
def test_wait_on_a_connection_that_wrote_nothing(
    binary: str, topology: SentinelTopology, valkey_topology: SentinelTopology
) -> None:
    """WAIT on a redis-py connection opened after another connection's write, with the replica paused behind that write, returns 1 at once on Valkey 9 (a connection that wrote nothing has write offset 0) but waits and returns 0 on Redis 7.0 (there every command, redis-py's HELLO 3 included, sets the connection's offset to the primary's)."""
    topo = topology if binary == "redis" else valkey_topology
    writer = redis.Redis.from_url(topo.primary_url, single_connection_client=True)
    try:
        with topo.paused(topo.replica):
            writer.set("woff:behind", "z")
            with redis.Redis.from_url(topo.primary_url, single_connection_client=True) as idle:
                assert command(idle, "WAIT", 1, 300) == (1 if binary == "valkey" else 0)
        topo.wait_caught_up()
    finally:
        writer.close()


def test_waitaof_counts_the_local_and_the_replica_fsync(
    valkey_topology: SentinelTopology,
) -> None:
    """On a Valkey primary with appendonly yes, `WAITAOF 1 0 1000` after a write returns [1, 0] while the replica is paused, and `WAITAOF 1 1 5000` returns [1, 1] once it is resumed."""
    topo = valkey_topology
    client = redis.Redis.from_url(topo.primary_url, single_connection_client=True)
    try:
        with topo.paused(topo.replica):
            client.set("aof:key", "1")
            assert command(client, "WAITAOF", 1, 0, 1000) == [1, 0]
        assert command(client, "WAITAOF", 1, 1, 5000) == [1, 1]
    finally:
        client.close()


def test_redis_7_0_has_no_waitaof(topology: SentinelTopology) -> None:
    """The machine's Redis 7.0 answers WAITAOF with an unknown-command error."""
    with pytest.raises(redis.ResponseError, match="unknown command"):
        command(topology.client(topology.primary), "WAITAOF", 0, 0, 100)


class _WatchedQueue(LifoQueue[Any]):
    """The pool's queue of free connections; `waiting` is set when a get() finds it empty."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.waiting = threading.Event()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block and self.empty():
            self.waiting.set()
        return super().get(block, timeout)


def test_blocking_sentinel_pool_waits_for_a_free_connection(topology: SentinelTopology) -> None:
    """Past max_connections a client on BlockingSentinelPool waits for a connection to come back (and fails with "No connection available." after the pool timeout if none does), where SentinelConnectionPool raises MaxConnectionsError at once."""
    sentinel = topology.sentinel_client()
    plain = sentinel.master_for(topology.service, max_connections=1)
    blocking = sentinel.master_for(
        topology.service,
        connection_pool_class=BlockingSentinelPool,
        max_connections=1,
        timeout=0.3,
        queue_class=_WatchedQueue,
    )
    try:
        held = plain.connection_pool.get_connection()
        with pytest.raises(redis.exceptions.MaxConnectionsError):
            plain.ping()
        plain.connection_pool.release(held)

        pool = blocking.connection_pool
        held = pool.get_connection()
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError, match="No connection available"):
            blocking.ping()
        assert time.monotonic() - started >= 0.3

        pool.timeout = 30
        pool.pool.waiting.clear()
        results: list[Any] = []
        waiter = threading.Thread(target=lambda: results.append(blocking.set("pool:k", "v")))
        waiter.start()
        assert pool.pool.waiting.wait(10)
        pool.release(held)
        waiter.join(30)
        assert results == [True]
    finally:
        plain.close()
        blocking.close()
        sentinel.close()


def test_kombu_sentinel_url_publishes_and_consumes_through_the_primary(
    topology: SentinelTopology,
) -> None:
    """A kombu Connection to `sentinel://:pw@h1:p1/0;sentinel://:pw@h2:p2/0;...` with transport options master_name and sentinel_kwargs puts a message on the primary and gets it back."""
    queue_name = "topology-check"
    with Connection(
        topology.broker_url, transport_options=topology.broker_transport_options
    ) as conn:
        queue = conn.SimpleQueue(queue_name)
        try:
            queue.put({"n": 1})
            assert topology.client(topology.primary).llen(queue_name) == 1
            message = queue.get(timeout=10)
            message.ack()
            assert message.payload == {"n": 1}
        finally:
            queue.close()


@pytest.mark.failover
@pytest.mark.parametrize(
    ("server", "sentinel"), [("redis", "redis"), ("valkey", "valkey"), ("valkey", "redis")]
)
def test_failover_promotes_the_replica_and_sentinel_clients_follow(
    server: Binary, sentinel: Binary
) -> None:
    """After kill_primary() the three sentinels agree on the promoted replica within 10 s, clients made before the crash (sync master_for on the default and the blocking pool; asyncio on the blocking pool with AsyncFollowingConnection and a retry) write to it without being rebuilt, and restart_old_primary() brings the old primary back as its replica with those writes."""
    with SentinelTopology(server, sentinel) as topo:
        asyncio.run(_failover_scenario(topo))


async def _failover_scenario(topo: SentinelTopology) -> None:
    sentinel = topo.sentinel_client(decode_responses=True)
    async_sentinel = redis.asyncio.sentinel.Sentinel(
        topo.sentinels, sentinel_kwargs={"socket_timeout": 2}, decode_responses=True
    )
    clients = {
        "default": sentinel.master_for(topo.service),
        "blocking": sentinel.master_for(
            topo.service, connection_pool_class=BlockingSentinelPool, timeout=5
        ),
    }
    async_client = async_sentinel.master_for(
        topo.service,
        connection_pool_class=AsyncBlockingSentinelPool,
        timeout=5,
        # The event loop is not run between the crash and the next command here, so the
        # pooled connection looks alive at checkout; a retry through the sentinels recovers.
        connection_class=AsyncFollowingConnection,
        retry=AsyncRetry(NoBackoff(), 1),
    )
    try:
        old, replica = topo.primary, topo.replica
        for name, client in clients.items():
            assert client.set(f"before:{name}", "1")
        assert await async_client.set("before:async", "1")
        topo.wait_caught_up()

        assert topo.kill_primary() == old
        assert topo.wait_for_failover(timeout=10) == replica

        for name, client in clients.items():
            assert client.set(f"after:{name}", "2")
        assert await async_client.set("after:async", "2")
        on_new = topo.client(replica)
        assert on_new.mget("after:default", "after:blocking", "after:async") == ["2", "2", "2"]

        assert topo.restart_old_primary() == old
        topo.wait_caught_up()
        on_old = topo.client(old)
        assert on_old.role()[0] == "slave"
        assert on_old.mget("after:default", "after:blocking", "after:async") == ["2", "2", "2"]
    finally:
        for client in clients.values():
            client.close()
        await async_client.aclose()
        await async_sentinel.aclose()
        sentinel.close()


@pytest.mark.failover
def test_a_retry_alone_reconnects_to_the_old_primary() -> None:
    """After a failover, redis.asyncio's retry of a command whose pooled connection died reconnects to the dead primary's address, while on AsyncFollowingConnection the same retry asks the sentinels and writes on the new primary."""
    with SentinelTopology() as topo:
        asyncio.run(_retry_scenario(topo))


async def _retry_scenario(topo: SentinelTopology) -> None:
    sentinel = redis.asyncio.sentinel.Sentinel(
        topo.sentinels, sentinel_kwargs={"socket_timeout": 2}, decode_responses=True
    )
    plain = sentinel.master_for(topo.service, retry=AsyncRetry(NoBackoff(), 2))
    following = sentinel.master_for(
        topo.service,
        connection_class=AsyncFollowingConnection,
        retry=AsyncRetry(NoBackoff(), 2),
    )
    try:
        assert await plain.set("retry:plain", "1")
        assert await following.set("retry:following", "1")
        old_host, old_port = topo.kill_primary()
        new = topo.wait_for_failover(timeout=10)

        with pytest.raises(redis.ConnectionError, match=f"connecting to {old_host}:{old_port}"):
            await plain.set("retry:plain", "2")
        assert await following.set("retry:following", "2")
        assert topo.client(new).get("retry:following") == "2"
    finally:
        await plain.aclose()
        await following.aclose()
        await sentinel.aclose()


def test_check_and_doctor_resolve_the_primary_through_the_sentinels(
    pg_harness: Any, topology: SentinelTopology
) -> None:
    """Through the sentinels, `check` reaches the primary and `doctor` reports the topology (one replica, the Sentinel service), fails min-replicas-to-write 0 and a replica count the topology cannot meet, each with its fix, and says what each durability loses."""
    from tests.test_cli import _doctor_lines, cachewarden

    h = pg_harness
    h.create_table("users")
    hosts = ",".join(f"{host}:{port}" for host, port in topology.sentinels)
    url = f"redis+sentinel://:data-pw@{hosts}/{topology.service}/0"
    user = {"table": "users", "key": "id", "ttl": "10m"}
    h.configure({"user": user}, redis_url=url, redis_options={"sentinel_password": "sentinel-pw"})
    checked = cachewarden("check", config=h.config_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"Sentinel service '{topology.service}'" in checked.stdout
    lines = _doctor_lines(h)
    ok, text = lines["replication"]
    assert not ok and "master with 1 replica(s)" in text and "min-replicas-to-write 1" in text
    ok, text = lines["durability"]
    assert ok and '"primary": a host crash loses' in text
    h.configure(
        {"user": user | {"durability": "replicas"}},
        redis_url=url,
        redis_options={"sentinel_password": "sentinel-pw", "replicas": 2},
    )
    ok, text = _doctor_lines(h)["durability"]
    assert not ok and "[redis] replicas = 2 but 1 replica(s) are online" in text
    assert '"replicas": a host crash or a failover loses nothing acknowledged' in text
