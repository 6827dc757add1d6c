"""A stream read whose reply is lost on the wire reorders nothing (issue 18, finding 1).

A TCP proxy between a real worker and Redis lets Redis execute the flusher's stream
read, then drops the reply with the connection. The flusher reads with a cursor
(`XRANGE`), so it sends the same read again and gets the same entries: nothing is
left behind to be applied after newer writes.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import pytest

from cachewarden.codec import decode_row
from cachewarden.errors import BackendUnavailable
from tests.conftest import Harness
from tests.helpers import REDIS_URL, wait_for
from tests.proxy import CuttingProxy

KEYS = 2_000
USER: dict[str, Any] = {"table": "users", "key": "id", "ttl": "10m"}


def test_reads_cut_after_redis_answered_leave_every_key_at_its_last_write(
    pg_harness: Harness,
) -> None:
    """With 10 stream reads answered by Redis and then cut before the worker heard the reply, 2,000 keys written v1 then v2 (no version column) all end at v2 in the database and the cache, and the buffer ends empty."""
    h = pg_harness
    h.create_table("users", version=False)
    url = urlparse(REDIS_URL)
    db = int(url.path.lstrip("/") or 0)
    with CuttingProxy(url.port or 6379, b"XRANGE", cuts=10, every=3) as proxy:
        h.configure(
            {"user": USER},
            {"user": {"shards": 1, "batch_size": 100, "max_delay": "50ms"}},
            redis_url=proxy.url(db),
        )
        for version in ("v1", "v2"):
            taken = h.cache.write_many("user", {k: {"name": f"{version}-{k}"} for k in range(KEYS)})
            assert len(taken.taken) == KEYS
        worker = h.worker(concurrency=1)
        wait_for(lambda: h.buffered() == 0, 120, what="the buffer to drain through the cuts")
        assert proxy.cut == 10, f"only {proxy.cut} reads were cut: {worker.output()[-2000:]}"
    names = {k: r["name"] for k, r in h.rows("users").items()}
    assert names == {k: f"v2-{k}" for k in range(KEYS)}
    redis, keys = h.context.redis, h.context.keys
    entries = redis.mget([keys.entry("user", str(k)) for k in range(KEYS)])
    assert [decode_row(e)["name"] if e else None for e in entries] == [
        f"v2-{k}" for k in range(KEYS)
    ]
    assert redis.hlen(keys.dirty("user", 0)) == 0


def test_a_write_whose_reply_is_lost_is_never_sent_twice(pg_harness: Harness) -> None:
    """When the connection breaks after Redis ran a write's enqueue script and before its reply came back, write() raises BackendUnavailable saying the write may be buffered and a retry is safe, and the stream holds that write once, not twice."""
    h = pg_harness
    h.create_table("users", version=False)
    url = urlparse(REDIS_URL)
    db = int(url.path.lstrip("/") or 0)
    with CuttingProxy(url.port or 6379, b"EVALSHA", cuts=0) as proxy:
        h.configure(
            {"user": USER}, {"user": {"shards": 1, "max_delay": "1h"}}, redis_url=proxy.url(db)
        )
        assert h.cache.write("user", 1, {"name": "first"})
        proxy.arm(1)
        with pytest.raises(BackendUnavailable, match="may or may not be buffered") as raised:
            h.cache.write("user", 2, {"name": "second"})
        assert proxy.cut == 1
        assert "writing it again is safe" in str(raised.value)
        stream = h.context.keys.stream("user", 0)
        kept = [fields["k"] for _, fields in h.context.redis.xrange(stream)]
        assert kept == ["1", "2"]
        assert h.cache.write("user", 3, {"name": "third"})  # the next write goes through
