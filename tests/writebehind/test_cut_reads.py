"""A stream read whose reply is lost on the wire reorders nothing (issue 18, finding 1).

A TCP proxy between a real worker and Redis lets Redis execute the flusher's stream
read, then drops the reply with the connection. The flusher reads with a cursor
(`XRANGE`), so it sends the same read again and gets the same entries: nothing is
left behind to be applied after newer writes.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from cachewarden.codec import decode_row
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
