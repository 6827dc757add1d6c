"""Dispatch: one flush task queued per due shard, on the write-behind family's own queue."""

from __future__ import annotations

import json
import time

import pytest

from cachewarden.celeryconf import task_client
from cachewarden.readpath.refresh import REFRESH_TASK
from cachewarden.readpath.sweep import SWEEP_TASK
from cachewarden.writebehind.dispatch import FLUSH_TASK, dispatch_once
from tests.conftest import Harness
from tests.test_cli import cachewarden

USER = {"table": "users", "key": "id", "ttl": "10m"}


def _sends_over(h: Harness, seconds: float) -> list[tuple[str, int]]:
    """Every flush a dispatcher sends for `seconds` of dispatching (no worker runs them)."""
    sent: list[tuple[str, int]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        dispatch_once(h.context, lambda entity, shard: sent.append((entity, shard)))
    return sent


@pytest.mark.parametrize(("requeue_after", "resent"), [(None, False), ("300ms", True)])
def test_a_queued_flush_is_sent_once_however_long_it_waits(
    pg_harness: Harness, requeue_after: str | None, resent: bool
) -> None:
    """A due shard whose flush waits in the queue for 4x lock_ttl gets no second task; with requeue_after under that wait it is sent again (the lost-task case)."""
    h = pg_harness
    h.create_table("users", version=False)
    entity = {"user": {"shards": 1, "max_delay": "10ms", "lock_ttl": "250ms"}}
    h.configure({"user": USER}, entity, requeue_after=requeue_after)
    h.cache.write("user", 1, {"name": "x"})
    sent = _sends_over(h, 1.0)
    assert set(sent) == {("user", 0)}
    assert (len(sent) > 1) is resent


def test_each_family_has_its_own_queue(pg_harness: Harness) -> None:
    """Flushes are routed to '<queue>.writebehind', refreshes and sweeps to '<queue>.readpath'."""
    h = pg_harness
    h.configure({"user": USER})
    assert h.settings is not None
    client = task_client(h.settings)
    for name in (FLUSH_TASK, REFRESH_TASK, REFRESH_TASK, SWEEP_TASK):
        client.send_task(name, args=[])
    lengths = {f: h.cache.redis.llen(f"{h.queue}.{f}") for f in ("writebehind", "readpath")}
    assert lengths == {"writebehind": 1, "readpath": 3}
    client.close()


def test_an_entity_removed_from_the_config_is_reported_not_reclaimed(pg_harness: Harness) -> None:
    """Writes buffered for an entity the config no longer defines are never claimed by a dispatcher, and `cachewarden stats` lists them as not configured."""
    h = pg_harness
    h.create_table("users", version=False)
    wb = {"max_delay": "10ms"}
    h.configure({"user": USER, "gone": USER}, {"user": wb, "gone": wb})
    h.cache.write("gone", 1, {"name": "x"})
    before = _sends_over(h, 0.3)
    assert {entity for entity, _ in before} == {"gone"}  # it was due and claimable
    h.context.redis.delete(*h.context.redis.keys(f"{h.prefix}:@wb:gone:*:queued"))
    h.configure({"user": USER}, {"user": wb})
    assert _sends_over(h, 0.3) == []
    assert not h.context.redis.keys(f"{h.prefix}:@wb:gone:*:queued")
    done = cachewarden("stats", "--json", config=h.config_path)
    gone = json.loads(done.stdout)["gone"]
    assert gone["configured"] is False and gone["pending"] == 1
    assert "NOT IN THE CONFIG" in cachewarden("stats", config=h.config_path).stdout
