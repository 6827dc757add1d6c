"""The shard count is recorded in Redis; a disagreeing config is refused; reshard moves the buffer."""

from __future__ import annotations

import pytest

from cachewarden.cache import Cache
from cachewarden.errors import Backpressure, ConfigError
from cachewarden.writebehind.flush import flush_shard
from cachewarden.writebehind.reshard import reshard
from tests.conftest import Harness
from tests.test_cli import cachewarden

USER = {"table": "users", "key": "id", "ttl": "10m"}
KEYS = range(200)


def _configure(h: Harness, shards: int) -> None:
    h.configure({"user": USER}, {"user": {"shards": shards, "max_delay": "10s"}})


def test_a_config_with_another_shard_count_is_refused_until_resharded(pg_harness: Harness) -> None:
    """With writes pending under shards = 4, a shards = 8 config is refused naming both counts; after `cachewarden reshard user 8` it is taken and the last write of every key wins."""
    h = pg_harness
    h.create_table("users", version=False)
    _configure(h, 4)
    for round_ in (1, 2):
        h.cache.write_many("user", {k: {"name": f"four-{round_}-{k}"} for k in KEYS})
    _configure(h, 8)
    assert h.settings is not None
    with pytest.raises(ConfigError, match="says 8, but Redis records 4") as refused:
        Cache(h.settings)
    assert "cachewarden reshard user 8" in str(refused.value)
    with Cache(h.settings, reflect=False) as lazy, pytest.raises(ConfigError, match="records 4"):
        lazy.write("user", 1, {"name": "x"})  # a Cache that skipped the check is refused too
    done = cachewarden("reshard", "user", "8", config=h.config_path)
    assert done.returncode == 0, done.stderr
    assert "4 -> 8 shards" in done.stdout
    assert h.count("users") == len(KEYS)  # drained through the old four shards
    with Cache(h.settings) as eight:
        for k in range(0, 200, 2):
            eight.write("user", k, {"name": f"eight-{k}"})
    for shard in range(8):
        assert flush_shard(h.context, "user", shard).status == "done"
    rows = h.rows("users")
    assert all(rows[k]["name"] == (f"eight-{k}" if k % 2 == 0 else f"four-2-{k}") for k in KEYS)
    _configure(h, 4)
    assert h.settings is not None
    with pytest.raises(ConfigError, match="says 4, but Redis records 8"):
        Cache(h.settings)


def test_writes_wait_while_a_reshard_drains(pg_harness: Harness) -> None:
    """While a reshard drains the old shards, write() raises Backpressure saying so; afterwards writes are taken."""
    h = pg_harness
    h.create_table("users", version=False)
    _configure(h, 2)
    h.cache.write("user", 1, {"name": "a"})
    seen: list[str] = []

    def during(line: str) -> None:
        if "draining" in line:
            with pytest.raises(Backpressure, match="resharded from 2 to 3") as caught:
                h.cache.write("user", 2, {"name": "b"})
            seen.append(str(caught.value))

    assert reshard(h.context, "user", 3, say=during) == 2
    assert seen
    _configure(h, 3)
    assert h.cache.write("user", 2, {"name": "b"})
