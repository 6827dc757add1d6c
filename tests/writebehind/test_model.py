"""Hypothesis drives one key's operations through the real flusher and checks a model.

Each example takes a fresh key and a random history: writes (some of which the
table's CHECK refuses) and deletes, with versions or without, flushes at random
points (a batch holds 2 entries, so one flush may apply several batches), and
stream reads cut on the wire after Redis answered them (a TCP proxy drops the
reply; a read and its resend both cut stop that flush where it is, and a later
one goes on from the stream's head). The model keeps the tombstones enqueue.lua keeps, splits the
taken operations into the flusher's batches, keeps each batch's survivor, tries
the next survivor where the database refused one (a dead letter), and applies it
with the database's version guard. After a final flush, the database row, `get()` and the dead letters must be
exactly what the model says, and the buffer must be empty.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError

from cachewarden.errors import Outranked
from cachewarden.writebehind.deadletters import list_dead
from cachewarden.writebehind.flush import flush_shard
from tests.conftest import Harness
from tests.helpers import REDIS_URL
from tests.proxy import CuttingProxy

NO_POISON = "CONSTRAINT no_poison CHECK (name <> 'poison')"
BATCH = 2


@dataclass(frozen=True)
class Step:
    """One step of a history: "w" write, "d" delete, "f" flush (with `cuts` reads cut)."""

    kind: str
    version: int = 0
    refused: bool = False
    cuts: int = 0
    every: int = 1


steps = st.one_of(
    st.builds(Step, st.just("w"), st.integers(1, 6), st.booleans()),
    st.builds(Step, st.just("d"), st.integers(1, 6)),
    st.builds(Step, st.just("f"), cuts=st.integers(0, 2), every=st.integers(1, 3)),
)


@dataclass(frozen=True)
class Taken:
    """An operation enqueue took: its step and the name it wrote."""

    step: Step
    name: str


class Model:
    """What the buffer and the database make of one key's operations: the flusher reads
    the stream in batches of BATCH entries, keeps each batch's surviving operation
    (the last one, unless it has a lower version than the one before it), and where
    the database refuses it (a dead letter), tries the survivor of the rest."""

    def __init__(self, versioned: bool) -> None:
        self.versioned = versioned
        self.row: tuple[str, int] | None = None  # (name, version)
        self.tomb: int | None = None
        self.pending: list[Taken] = []
        self.letters = 0

    def taken(self, step: Step) -> bool:
        """Whether enqueue takes the operation (a newer delete's tombstone ignores it)."""
        return not (self.versioned and self.tomb is not None and step.version <= self.tomb)

    def enqueue(self, step: Step, name: str) -> None:
        if step.kind == "d" and self.versioned:
            self.tomb = step.version
        self.pending.append(Taken(step, name))

    def flush(self, entries: int) -> None:
        """The flusher settled the first `entries` pending operations (whole batches)."""
        assert entries % BATCH == 0 or entries == len(self.pending)
        for start in range(0, entries, BATCH):
            batch = self.pending[start : min(start + BATCH, entries)]
            while batch:
                survivor = self._survivor(batch)
                if not survivor.step.refused:
                    self._apply(survivor)
                    break
                self.letters += 1
                batch = [t for t in batch if t is not survivor]
        self.pending = self.pending[entries:]

    def _survivor(self, batch: list[Taken]) -> Taken:
        current = batch[0]
        for taken in batch[1:]:
            if not self.versioned or taken.step.version >= current.step.version:
                current = taken
        return current

    def _apply(self, taken: Taken) -> None:
        step = taken.step
        if step.kind == "d":
            if not self.versioned or (self.row is not None and self.row[1] <= step.version):
                self.row = None
        elif not self.versioned or self.row is None or self.row[1] <= step.version:
            self.row = (taken.name, step.version if self.versioned else 0)


_keys = itertools.count(1)


def _run(h: Harness, proxy: CuttingProxy, versioned: bool, history: list[Step]) -> None:
    key = next(_keys)
    model = Model(versioned)
    for n, step in enumerate(history):
        if step.kind == "f":
            proxy.arm(step.cuts, step.every)
            try:
                assert flush_shard(h.context, "user", 0).status == "done"
            except RedisConnectionError:  # a read and its resend both cut: the flush stops
                pass
            model.flush(len(model.pending) - h.buffered())
            continue
        name = "poison" if step.refused else f"n{n}"
        version = {"version": step.version} if versioned else {}
        try:
            if step.kind == "w":
                done = h.cache.write("user", key, {"name": name, **version})
            else:
                done = h.cache.delete("user", key, step.version if versioned else None)
        except Outranked:  # a newer delete's tombstone: not taken
            done = ""
        assert bool(done) == model.taken(step)
        if done:
            model.enqueue(step, name)
    proxy.arm(0)
    assert flush_shard(h.context, "user", 0).status == "done"
    model.flush(len(model.pending))
    assert h.buffered() == 0
    row = h.rows("users").get(key)
    got = None if row is None else (row["name"], row["version"] if versioned else 0)
    want = model.row
    assert got == want, history
    expected = None if want is None else {"id": key, "name": want[0]}
    if expected is not None and versioned:
        expected["version"] = want[1]
    assert h.cache.get("user", key) == expected, history
    letters = [x for x in list_dead(h.cache.redis, h.cache.keys, "user") if x.key == str(key)]
    assert len(letters) == model.letters, history
    assert all(json.loads(x.value)["name"] == "poison" for x in letters)


@pytest.mark.parametrize("versioned", [True, False])
def test_one_keys_history_ends_where_the_model_says(harness: Harness, versioned: bool) -> None:
    """For random histories of one key (writes, refused writes, deletes, versions, flushes at random points, batches of 2, stream reads cut after Redis answered), the database row, get() and the key's dead letters end exactly as the model of sequential application says, with the buffer empty."""
    h = harness
    h.create_table("users", version=versioned, extra=NO_POISON)
    url = urlparse(REDIS_URL)
    db = int(url.path.lstrip("/") or 0)
    entity: dict[str, Any] = {"table": "users", "key": "id", "ttl": "10m"}
    if versioned:
        entity["version_column"] = "version"
    with CuttingProxy(url.port or 6379, b"XRANGE", cuts=0) as proxy:
        h.configure(
            {"user": entity},
            {"user": {"shards": 1, "batch_size": 2, "max_dead_letters": 100_000}},
            redis_url=proxy.url(db),
        )
        cut_before = proxy.cut

        @settings(
            max_examples=40,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(st.lists(steps, min_size=1, max_size=12))
        def check(history: list[Step]) -> None:
            _run(h, proxy, versioned, history)

        check()
        assert proxy.cut > cut_before  # the histories did meet cut reads
