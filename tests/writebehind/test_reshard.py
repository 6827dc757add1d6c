"""The shard count Redis records is the one every process follows; reshard moves the buffer under running workers."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from cachewarden.cache import Cache
from cachewarden.celeryconf import task_client
from cachewarden.context import Context
from cachewarden.errors import Backpressure
from cachewarden.keys import shard_of
from cachewarden.readpath.refresh import read_scripts
from cachewarden.readpath.singleflight import Role
from cachewarden.scripts.readpath import new_token
from cachewarden.warming.run import WARM_TASK, start_run
from cachewarden.warming.status import Run, read_runs
from cachewarden.writebehind import shardcount
from cachewarden.writebehind.deadletters import count_dead
from cachewarden.writebehind.flush import flush_shard
from cachewarden.writebehind.reshard import reshard
from tests.conftest import Harness
from tests.helpers import wait_for
from tests.test_cli import cachewarden

USER = {"table": "users", "key": "id", "ttl": "10m"}
VERSIONED = {**USER, "version_column": "version"}
KEYS = range(200)


def _configure(h: Harness, shards: int, entity: dict[str, Any] | None = None) -> None:
    h.configure(
        {"user": entity or USER},
        {"user": {"shards": shards, "max_delay": "50ms"}},
        warming={"all": {"entity": "user", "every": "1h", "chunk_size": 100}},
    )


@pytest.fixture
def process() -> Iterator[Callable[[Harness], Context]]:
    """Another process's context on the harness's config (closed after the test)."""
    made: list[Context] = []

    def make(h: Harness) -> Context:
        made.append(Context(h.context.settings))
        return made[-1]

    yield make
    for context in made:
        context.close()


def _lengths(h: Harness, shards: int) -> list[int]:
    redis, keys = h.context.redis, h.context.keys
    return [int(redis.xlen(keys.stream("user", s))) for s in range(shards)]


def _flush(context: Context, shards: int) -> None:
    for shard in range(shards):
        assert flush_shard(context, "user", shard).status == "done"


def _entry(h: Harness, key: int) -> Any:
    raw = h.context.redis.get(h.context.keys.entry("user", str(key)))
    return None if raw is None else json.loads(raw)


def _key_whose_shard_moves(old: int, new: int, below: int = 1000) -> int:
    """A key whose dirty hash under `new` shards is not its hash under `old` (nor any old one)."""
    return next(k for k in range(below) if shard_of(str(k), new) >= old)


def test_a_config_with_another_shard_count_warns_and_follows_the_record(
    pg_harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """With writes pending under shards = 4, a Cache whose config says 8 starts, logs a warning naming both counts and the reshard command, and writes to the 4 recorded shards; after `cachewarden reshard user 8` the same Cache writes to 8 shards and the last write of every key wins."""
    h = pg_harness
    h.create_table("users", version=False)
    _configure(h, 4)
    for round_ in (1, 2):
        h.cache.write_many("user", {k: {"name": f"four-{round_}-{k}"} for k in KEYS})
    _configure(h, 8)
    assert h.settings is not None
    with caplog.at_level(logging.WARNING, logger="cachewarden.shards"):
        eight = Cache(h.settings)
    [warning] = [r.msg for r in caplog.records if r.name == "cachewarden.shards"]
    assert warning["event"] == "shard_count_differs"
    assert "says 8, but Redis records 4" in warning["detail"]
    assert "cachewarden reshard user 8" in warning["detail"]
    with eight:
        eight.write("user", 1, {"name": "still-four"})
        assert _lengths(h, 8)[4:] == [0, 0, 0, 0]  # nothing on a shard the record lacks
        done = cachewarden("reshard", "user", "8", config=h.config_path)
        assert done.returncode == 0, done.stderr
        assert "4 -> 8 shards" in done.stdout
        assert h.count("users") == len(KEYS)  # drained through the old four shards
        for k in range(0, 200, 2):
            eight.write("user", k, {"name": f"eight-{k}"})
    assert sum(_lengths(h, 8)[4:]) > 0  # the same Cache now writes to all eight
    _flush(h.context, 8)
    rows = h.rows("users")
    last = {k: f"eight-{k}" if k % 2 == 0 else f"four-2-{k}" for k in KEYS} | {1: "still-four"}
    assert {k: rows[k]["name"] for k in KEYS} == last


def test_writes_wait_while_a_reshard_drains(pg_harness: Harness) -> None:
    """While a reshard drains the old shards, write() raises Backpressure saying so; afterwards the same Cache's writes are taken."""
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
    assert h.cache.write("user", 2, {"name": "b"})


def test_a_cache_that_read_the_old_count_follows_the_new_one_at_its_next_write(
    pg_harness: Harness,
    process: Callable[[Harness], Context],
) -> None:
    """A Cache that read count 2 a moment before a reshard to 3 has its next write and write_many refused whole by Redis ("!SHARDS 3"), re-reads the count and sends them once more: every one is taken, on its shard of 3."""
    h = pg_harness
    h.create_table("users", version=False)
    _configure(h, 2)
    cache = h.cache
    cache.write("user", 1, {"name": "a"})
    moved = _key_whose_shard_moves(2, 3)
    other = process(h)
    assert reshard(other, "user", 3, say=lambda _: None) == 2
    shardcount.learn(cache.context, "user", "2")  # as read a moment ago (within FRESH_S)
    assert shardcount.current(cache.context, "user") == 2
    assert cache.write("user", moved, {"name": "moved"})
    assert shardcount.current(cache.context, "user") == 3
    assert _lengths(h, 3)[shard_of(str(moved), 3)] == 1 and shard_of(str(moved), 3) == 2
    shardcount.learn(cache.context, "user", "2")
    batch = cache.write_many("user", {k: {"name": f"n{k}"} for k in range(10, 30)})
    assert batch.ok and len(batch.taken) == 20
    _flush(h.context, 3)
    rows = h.rows("users")
    assert rows[moved]["name"] == "moved" and all(rows[k]["name"] == f"n{k}" for k in range(10, 30))


def test_a_process_started_on_the_old_count_flushes_the_new_shards(
    pg_harness: Harness, process: Callable[[Harness], Context]
) -> None:
    """A process whose config and first read said 2 shards flushes shards 2 and 3 after a reshard to 4 (no IndexError, no restart), and a flush of a shard past a smaller count finds nothing to do."""
    h = pg_harness
    h.create_table("users", version=False)
    _configure(h, 2)
    old = h.context
    old.entity("user")
    h.cache.write("user", 0, {"name": "zero"})
    assert shardcount.current(old, "user") == 2
    other = process(h)
    reshard(other, "user", 4, say=lambda _: None)
    h.cache.write_many("user", {k: {"name": f"n{k}"} for k in range(100)})
    lengths = _lengths(h, 4)
    assert lengths[2] > 0 and lengths[3] > 0  # writes on shard numbers the config lacks
    assert shardcount.current(old, "user") == 2  # its view: still the old count
    for shard in (2, 3):
        result = flush_shard(old, "user", shard)
        assert result.status == "done" and result.entries == lengths[shard], result
    _flush(old, 2)
    assert h.count("users") == 100
    reshard(other, "user", 2, say=lambda _: None)
    assert flush_shard(old, "user", 3).status == "done"


def _pending_older_than_the_database(h: Harness, key: int) -> None:
    """Key `key`: its row at version 10 flushed and cached, then a write at version 5
    pending (enqueue keeps the newer cached row: the entry keeps its TTL)."""
    h.cache.write("user", key, {"name": "ten", "version": 10})
    _flush(h.context, 4)
    h.cache.write("user", key, {"name": "five", "version": 5})


def test_a_warm_run_on_the_old_count_checks_the_dirty_hashes_of_the_recorded_count(
    pg_harness: Harness,
    process: Callable[[Harness], Context],
) -> None:
    """A warm run in a process whose scripts were built for 2 shards, after a reshard to 4, finds a key's pending write in the dirty hash of the recorded count (the old count's hash lacks it) and counts the key skipped."""
    h = pg_harness
    h.create_table("users")
    _configure(h, 2, VERSIONED)
    with h.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id, name, version) VALUES (0, 'db', 0)"))
    stale = process(h)
    h.cache.write("user", 0, {"name": "zero", "version": 1})  # the record: 2 shards
    assert start_run(stale, "all")["state"] == "done"  # its scripts are built for 2
    reshard(h.context, "user", 4, say=lambda _: None)
    key = _key_whose_shard_moves(2, 4)
    _pending_older_than_the_database(h, key)
    redis, keys = h.context.redis, h.context.keys
    assert redis.hexists(keys.dirty("user", shard_of(str(key), 4)), str(key))
    assert not redis.hexists(keys.dirty("user", shard_of(str(key), 2)), str(key))
    assert redis.pttl(keys.entry("user", str(key))) > 0  # no TTL guard applies to it
    assert start_run(stale, "all")["state"] == "done"
    _, last, _ = read_runs(redis, keys, "all")
    assert last is not None and last["skipped"] == 1 and last["filled"] == 1


def test_a_warm_fill_leaves_alone_an_entry_without_ttl_that_no_dirty_hash_it_checks_names(
    pg_harness: Harness,
    process: Callable[[Harness], Context],
) -> None:
    """With no count recorded to check against, a warm run on the old count's dirty hashes, none of which holds a key's pending write, still leaves the key's entry (no TTL: a write is pending) as written, where a fill would have put the older database row."""
    h = pg_harness
    h.create_table("users", version=False)
    _configure(h, 2)
    with h.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO users (id, name) SELECT g, 'db' FROM generate_series(0, 49) g")
        )
    stale = process(h)
    h.cache.write("user", 999, {"name": "record"})  # the record: 2 shards
    assert start_run(stale, "all")["state"] == "done"  # its scripts are built for 2
    reshard(h.context, "user", 4, say=lambda _: None)
    key = _key_whose_shard_moves(2, 4, below=50)
    h.cache.write("user", key, {"name": "written"})
    redis, keys = h.context.redis, h.context.keys
    redis.delete(keys.shard_count("user"))  # (no record: the fill cannot tell the count)
    assert not any(redis.hexists(keys.dirty("user", s), str(key)) for s in (0, 1))
    assert redis.pttl(keys.entry("user", str(key))) == -1
    assert h.rows("users")[key]["name"] == "db"  # what a fill would write over it
    assert start_run(stale, "all")["state"] == "done"
    assert _entry(h, key) == {"id": key, "name": "written"}
    assert _entry(h, key + 1 if key < 49 else key - 1)["name"] == "db"  # its neighbours filled
    _, last, _ = read_runs(redis, keys, "all")
    assert last is not None and last["skipped"] == 1


def _warm_on_the_worker(h: Harness) -> Run:
    """Send a run of job "all" to the workers, as `cachewarden warm all` does; its end."""
    request = uuid.uuid4().hex
    client = task_client(h.context.settings)
    client.send_task(WARM_TASK, args=["all", None, request])
    client.close()

    def ended() -> Run | None:
        _, last, _ = read_runs(h.context.redis, h.context.keys, "all")
        return last if last is not None and last["request"] == request else None

    run: Run = wait_for(ended, 20, what="the worker's warm run")
    assert run.state == "done", run.fields
    return run


class _Writer(threading.Thread):
    """Writes every key again and again (names "w<round>-<key>") until stopped; keeps
    the last value of each key that was taken."""

    def __init__(self, cache: Cache, keys: range) -> None:
        super().__init__(daemon=True)
        self.cache, self.keys = cache, keys
        self.last: dict[int, str] = {}
        self.refused = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        round_ = 0
        try:
            while not self.stop.is_set():
                round_ += 1
                names = {k: f"w{round_}-{k}" for k in self.keys}
                try:
                    batch = self.cache.write_many(
                        "user", {k: {"name": n} for k, n in names.items()}
                    )
                except Backpressure:
                    self.refused += 1  # a reshard drains: nothing of the round was taken
                else:
                    self.last.update({int(k): names[int(k)] for k in batch.taken})
                    self.refused += len(batch.refused)
                time.sleep(0.05)
        except BaseException as exc:
            self.error = exc


def _written_again(writer: _Writer, what: str) -> None:
    """Wait until the writer has had every key taken again since now."""
    before = dict(writer.last)
    wait_for(lambda: all(writer.last[k] != v for k, v in before.items()), 10, what=what)


@pytest.mark.timeout(60)
def test_reshard_under_a_running_worker_writes_and_warm_runs(
    pg_harness: Harness, process: Callable[[Harness], Context]
) -> None:
    """`reshard user 4` while a Celery worker started on 2 shards keeps running under writes and warm runs: no pending write is overwritten (a warm run on the worker meets every key with a write pending and fills none), and every key's last write lands in PostgreSQL and the cache, with no worker restart."""
    h = pg_harness
    h.create_table("users", version=False)
    keys = range(300)
    with h.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO users (id, name) SELECT g, 'db' FROM generate_series(0, 299) g")
        )
    h.configure(
        {"user": USER},
        {"user": {"shards": 2, "max_delay": "2s", "batch_size": 100_000}},
        warming={"all": {"entity": "user", "every": "1h", "chunk_size": 100}},
    )
    worker = h.worker(concurrency=2)
    assert worker.proc is not None
    pid = worker.proc.pid
    redis, rkeys = h.context.redis, h.context.keys

    def settled() -> bool:
        dirty = sum(int(redis.hlen(rkeys.dirty("user", s))) for s in range(4))
        return dirty == 0 and sum(_lengths(h, 4)) == 0

    writer = _Writer(h.cache, keys)
    writer.start()
    wait_for(lambda: len(writer.last) == len(keys), 10, what="a first round of writes")
    _warm_on_the_worker(h)
    mover = process(h)
    assert reshard(mover, "user", 4, say=lambda _: None) == 2
    _written_again(writer, "every key written again on 4 shards")
    _warm_on_the_worker(h)  # the worker's warm scripts were built for 2 shards
    writer.stop.set()
    writer.join(10)
    assert writer.error is None, writer.error
    wait_for(settled, 20, what="the worker to flush every shard, old and new")
    added = [int(redis.xinfo_stream(rkeys.stream("user", s))["entries-added"]) for s in (2, 3)]
    assert all(n > 0 for n in added)  # shards 2 and 3 took writes, and the worker flushed them
    # The last writes: pending for max_delay while the worker warms every key's older row.
    last = h.cache.write_many("user", {k: {"name": f"last-{k}"} for k in keys})
    assert last.ok
    assert {shard_of(str(k), 4) for k in keys} == {0, 1, 2, 3}
    run = _warm_on_the_worker(h)
    assert run["rows"] == len(keys) and run["skipped"] == len(keys) and run["filled"] == 0
    wait_for(settled, 20, what="the last writes to be flushed")
    rows = h.rows("users")
    assert {k: rows[k]["name"] for k in keys} == {k: f"last-{k}" for k in keys}
    assert {k: _entry(h, k) for k in keys} == {k: {"id": k, "name": f"last-{k}"} for k in keys}
    assert worker.proc.pid == pid and not worker.exited
    assert "IndexError" not in worker.output()


def test_flush_stats_and_status_follow_the_shards_a_reshard_added(pg_harness: Harness) -> None:
    """After `reshard user 4` with the config still saying 2 shards, `stats`, `status` and the harness count the writes pending on shards 2 and 3, and `cachewarden flush user` says they reached the database only once every one of them has."""
    h = pg_harness
    h.create_table("users", version=False)
    h.configure({"user": USER}, {"user": {"shards": 2, "max_delay": "60s"}})
    h.worker(concurrency=1)
    h.cache.write("user", 0, {"name": "zero"})  # the record: 2 shards
    assert reshard(h.context, "user", 4, say=lambda _: None) == 2
    h.cache.write_many("user", {k: {"name": f"n{k}"} for k in range(1, 101)})
    lengths = _lengths(h, 4)
    assert lengths[2] > 0 and lengths[3] > 0 and sum(lengths) == 100
    stats = cachewarden("stats", "--json", config=h.config_path)
    assert stats.returncode == 0, stats.stderr
    user = json.loads(stats.stdout)["user"]
    assert user["pending"] == 100 and user["pending_per_shard"] == lengths
    status = cachewarden("status", "--json", config=h.config_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["entities"]["user"]["pending"] == 100
    assert h.buffered() == 100
    done = cachewarden("flush", "user", config=h.config_path)
    assert done.returncode == 0, done.stderr
    assert "100 pending writes of user reached the database" in done.stdout
    assert _lengths(h, 4) == [0, 0, 0, 0] and h.buffered() == 0
    rows = h.rows("users")
    assert {k: rows[k]["name"] for k in range(1, 101)} == {k: f"n{k}" for k in range(1, 101)}


def test_the_read_path_checks_the_dirty_hashes_of_the_recorded_count(
    pg_harness: Harness, process: Callable[[Harness], Context]
) -> None:
    """In a process whose config says 2 shards, after a reshard to 4, a key whose entry is gone while its write waits on shard 2 or 3 is seen as pending: a read takes no lease (it waits for the write), a batch reload leases only the key without one, and a fill under a lease leaves the entry absent instead of putting the database's older row there."""
    h = pg_harness
    h.create_table("users", version=False)
    _configure(h, 2)
    key = _key_whose_shard_moves(2, 4)
    other = key + 1 if shard_of(str(key + 1), 4) < 2 else key + 2
    with h.engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO users (id, name) VALUES ({key}, 'db'), ({other}, 'db')"))
    h.cache.write("user", 999, {"name": "record"})  # the record: 2 shards
    reshard(h.context, "user", 4, say=lambda _: None)
    h.cache.write("user", key, {"name": "written"})
    redis, keys = h.context.redis, h.context.keys
    assert redis.hexists(keys.dirty("user", shard_of(str(key), 4)), str(key))
    redis.delete(keys.entry("user", str(key)))  # (the entry lost while its write waits)
    reader = process(h)
    assert reader.entity("user").write_behind.shards == 2
    side = read_scripts(reader, "user")
    token = new_token()
    reply = side.read(str(key), token)
    assert reply.value is None and reply.flag == Role.PENDING_WRITE.value
    assert not redis.exists(keys.lease("user", str(key)))
    assert side.lease_many([str(key), str(other)], token, None) == [str(other)]
    redis.set(keys.lease("user", str(key)), token, px=10_000)  # a lease taken all the same
    assert side.fill(str(key), token, json.dumps({"id": key, "name": "db"})) == (False, None)
    assert not redis.exists(keys.entry("user", str(key)))
    flush_shard(h.context, "user", shard_of(str(key), 4))
    assert h.rows("users")[key]["name"] == "written"


@pytest.mark.timeout(120)
def test_a_reshard_blocked_by_max_dead_letters_stops_and_runs_again_once_they_are_replayed(
    pg_harness: Harness,
) -> None:
    """`cachewarden reshard user 2` meeting max_dead_letters with a write still pending exits 1 naming the dead letters, `cachewarden dead-letters list user` and the reshard to run again, with the record back at 1 shard and nothing pending lost; once the table is fixed and the letters replayed, running it again moves the buffer to 2 shards and every write lands."""
    h = pg_harness
    h.create_table("users", version=False, extra="CONSTRAINT no_poison CHECK (name <> 'poison')")
    wb = {"shards": 1, "max_dead_letters": 2, "batch_size": 1, "max_delay": "60s"}
    h.configure({"user": USER}, {"user": wb})
    for key, name in ((1, "poison"), (2, "poison"), (3, "good")):
        h.cache.write("user", key, {"name": name})
    redis, keys = h.context.redis, h.context.keys
    stopped = cachewarden("reshard", "user", "2", config=h.config_path)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert "2 dead letters are waiting (write_behind.max_dead_letters = 2)" in stopped.stderr
    assert "`cachewarden dead-letters list user`" in stopped.stderr
    assert "run `cachewarden reshard user 2` again" in stopped.stderr
    assert shardcount.recorded(redis, keys, "user") == "1"
    assert count_dead(redis, keys, "user") == 2 and h.buffered() == 1
    with h.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE users DROP CONSTRAINT no_poison"))
    replayed = cachewarden("dead-letters", "replay", "user", config=h.config_path)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert count_dead(redis, keys, "user") == 0 and h.buffered() == 3
    done = cachewarden("reshard", "user", "2", config=h.config_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 -> 2 shards" in done.stdout
    assert shardcount.recorded(redis, keys, "user") == "2" and h.buffered() == 0
    names = {k: r["name"] for k, r in h.rows("users").items()}
    assert names == {1: "poison", 2: "poison", 3: "good"}
