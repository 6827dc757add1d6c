"""Dead letters: a row the database refuses is isolated, kept with its error, and replayable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cachewarden.errors import Backpressure, Outranked
from cachewarden.keys import shard_of
from cachewarden.scripts.writebehind import WriteScripts
from cachewarden.writebehind import shardcount
from cachewarden.writebehind.deadletters import DeadLetter, count_dead, discard, list_dead, replay
from cachewarden.writebehind.flush import flush_shard
from cachewarden.writebehind.reshard import reshard
from cachewarden.writebehind.sink import SqlSink
from tests.conftest import Harness
from tests.helpers import wait_for

ROWS = 1_000
POISON = 577
USER = {"table": "users", "key": "id", "ttl": "10m"}
NO_POISON = "CONSTRAINT no_poison CHECK (name <> 'poison')"
CLI = Path(sys.executable).with_name("cachewarden")


def _setup(h: Harness) -> None:
    """A users table that refuses the name 'poison', and a user entity on it."""
    h.create_table("users", version=False, extra=NO_POISON)
    h.configure({"user": USER}, {"user": {"max_delay": "50ms", "shards": 4}})


def _flush_all(h: Harness) -> None:
    """Flush every shard of "user" in this process until the buffer is empty."""
    shards = h.context.entity("user").write_behind.shards
    for shard in range(shards):
        result = flush_shard(h.context, "user", shard)
        assert result.status == "done", result
    assert h.buffered() == 0


def _dead(h: Harness) -> list[DeadLetter]:
    return list_dead(h.cache.redis, h.cache.keys, "user")


def _replay(h: Harness, letter: DeadLetter, force: bool = False) -> str:
    return replay(h.cache.redis, h.cache.keys, h.context.entity("user"), letter, force=force)


def _fix_table(h: Harness) -> None:
    """Drop the no_poison constraint (SQLite cannot: rebuild the table without it)."""
    with h.engine.begin() as conn:
        if h.dialect != "sqlite":
            conn.execute(sa.text("ALTER TABLE users DROP CONSTRAINT no_poison"))
            return
        conn.execute(
            sa.text("CREATE TABLE users_fixed (id INTEGER PRIMARY KEY, name VARCHAR(200) NOT NULL)")
        )
        conn.execute(sa.text("INSERT INTO users_fixed (id, name) SELECT id, name FROM users"))
        conn.execute(sa.text("DROP TABLE users"))
        conn.execute(sa.text("ALTER TABLE users_fixed RENAME TO users"))


def _cached(h: Harness, key: int) -> str | None:
    value: str | None = h.cache.redis.get(h.cache.keys.entry("user", str(key)))
    return value


def test_poison_row_is_isolated_dead_lettered_and_replayed(harness: Harness) -> None:
    """One poison row among 1,000: 999 land, it waits dead-lettered with the database's error
    and out of the cache, and it lands once the table is fixed and it is replayed."""
    h = harness
    _setup(h)
    for i in range(1, ROWS + 1):
        h.cache.write("user", i, {"name": "poison" if i == POISON else f"n{i}"})
    _flush_all(h)

    rows = h.rows("users")
    assert len(rows) == ROWS - 1
    assert POISON not in rows
    assert all(rows[i]["name"] == f"n{i}" for i in rows)
    dead = _dead(h)
    assert [(d.op, d.key) for d in dead] == [("w", str(POISON))]
    assert "no_poison" in dead[0].error, dead[0].error
    assert json.loads(dead[0].value) == {"id": POISON, "name": "poison"}
    assert _cached(h, POISON) is None, "the cache must not serve a row the database refused"
    assert json.loads(_cached(h, 1) or "null") == {"id": 1, "name": "n1"}
    assert h.cache.redis.pttl(h.cache.keys.entry("user", "1")) > 0

    _fix_table(h)
    assert _replay(h, dead[0]) != "superseded"
    assert count_dead(h.cache.redis, h.cache.keys, "user") == 0
    h.worker(concurrency=1)
    wait_for(
        lambda: h.buffered() == 0 and h.count("users") == ROWS, 60, what="the replayed row to land"
    )
    assert h.rows("users")[POISON]["name"] == "poison"
    assert _dead(h) == []
    shard = shard_of(str(POISON), 4)
    wait_for(
        lambda: not h.cache.redis.hexists(h.cache.keys.dirty("user", shard), str(POISON)),
        30,
        what="the replayed write to be settled",
    )
    assert json.loads(_cached(h, POISON) or "null") == {"id": POISON, "name": "poison"}
    assert h.cache.redis.pttl(h.cache.keys.entry("user", str(POISON))) > 0


def test_superseded_dead_letter_is_not_replayed(pg_harness: Harness) -> None:
    """A dead letter whose key was written again is dropped on replay ("superseded"); the
    newer value stays in the database and the cache."""
    h = pg_harness
    _setup(h)
    h.cache.write("user", 7, {"name": "poison"})
    _flush_all(h)
    [letter] = _dead(h)
    h.cache.write("user", 7, {"name": "newer"})
    assert _replay(h, letter) == "superseded"
    assert _dead(h) == []
    _flush_all(h)
    assert h.rows("users")[7]["name"] == "newer"
    assert json.loads(_cached(h, 7) or "null") == {"id": 7, "name": "newer"}


def test_force_replays_a_superseded_dead_letter(pg_harness: Harness) -> None:
    """`force=True` replays a dead letter even though a newer write superseded it."""
    h = pg_harness
    _setup(h)
    h.cache.write("user", 7, {"name": "poison"})
    _flush_all(h)
    [letter] = _dead(h)
    h.cache.write("user", 7, {"name": "newer"})
    _flush_all(h)
    _fix_table(h)
    assert _replay(h, letter, force=True) != "superseded"
    assert _dead(h) == []
    _flush_all(h)
    assert h.rows("users")[7]["name"] == "poison"


def test_discard_removes_one_dead_letter(pg_harness: Harness) -> None:
    """`discard` deletes exactly the dead letter it names and leaves the others."""
    h = pg_harness
    _setup(h)
    for key in (1, 2, 3):
        h.cache.write("user", key, {"name": "poison" if key != 2 else "fine"})
    _flush_all(h)
    dead = {d.key: d for d in _dead(h)}
    assert sorted(dead) == ["1", "3"]
    assert discard(h.cache.redis, h.cache.keys, "user", dead["1"].id) is True
    assert [d.key for d in _dead(h)] == ["3"]
    assert discard(h.cache.redis, h.cache.keys, "user", dead["1"].id) is False
    assert sorted(h.rows("users")) == [2]


def _cli(h: Harness, *args: str, verb: str = "dead-letters") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CACHEWARDEN_LOG_FORMAT": "json"}
    return subprocess.run(
        [str(CLI), "--config", str(h.config_path), verb, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_cli_lists_and_replays_dead_letters(pg_harness: Harness) -> None:
    """`cachewarden dead-letters list` shows the poison row and its error; `replay` re-enqueues
    it so that it lands once the table is fixed."""
    h = pg_harness
    _setup(h)
    h.cache.write("user", 5, {"name": "poison"})
    _flush_all(h)
    listed = _cli(h, "list", "user", "--json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    [shown] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert shown["key"] == "5" and "no_poison" in shown["error"], shown
    _fix_table(h)
    replayed = _cli(h, "replay", "user")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "replayed" in replayed.stdout, replayed.stdout
    assert _dead(h) == []
    _flush_all(h)
    assert h.rows("users")[5]["name"] == "poison"


def test_rows_from_other_writers_that_the_table_cannot_take_are_dead_lettered(
    pg_harness: Harness,
) -> None:
    """Rows enqueued by a non-Python writer without the key column or with an unknown column go to dead letters with a message, and the rest land."""
    from cachewarden.scripts import source

    h = pg_harness
    _setup(h)
    keys = h.cache.keys
    script = h.cache.redis.register_script(source("enqueue"))
    shard = shard_of("1", 4)
    bad = {"1": '{"name":"no key column"}', "2": '{"id":2,"name":"x","colour":"red"}'}
    for key, value in bad.items():
        shard = shard_of(key, 4)
        script(
            keys=[
                keys.due(),
                keys.dead_keys("user"),
                keys.dead("user"),
                keys.shard_count("user"),
                keys.memory_mark(),
                keys.tombstones("user"),
                keys.entry("user", key),
                keys.stream("user", shard),
                keys.dirty("user", shard),
                keys.lease("user", key),
                keys.tombstone("user", key),
            ],
            args=[
                1000,
                1000,
                1000,
                "",
                86_400_000,
                10,
                4,
                0.1,
                "w",
                key,
                value,
                "",
                f"user:{shard}",
            ],
        )
    h.cache.write("user", 3, {"name": "good"})
    _flush_all(h)
    assert set(h.rows("users")) == {3}
    errors = {letter.key: letter.error for letter in _dead(h)}
    assert "key column" in errors["1"]
    assert "'colour' is not in table" in errors["2"]


def _poison_setup(h: Harness, max_dead: int = 10_000, batch_size: int = 1000) -> None:
    h.create_table("users", version=False, extra=NO_POISON)
    wb = {"shards": 1, "max_dead_letters": max_dead, "batch_size": batch_size}
    h.configure({"user": USER}, {"user": wb})


def test_at_max_dead_letters_writes_and_flushes_stop_and_nothing_is_dropped(
    pg_harness: Harness,
) -> None:
    """With max_dead_letters dead letters held, write() raises Backpressure naming them and the flusher takes no new batch; after a discard both resume and every taken write lands."""
    h = pg_harness
    _poison_setup(h, max_dead=2, batch_size=1)  # one write per batch
    cache = h.cache
    for key in (1, 2):
        cache.write("user", key, {"name": "poison"})
        assert flush_shard(h.context, "user", 0).status == "done"
    assert count_dead(cache.redis, cache.keys, "user") == 2
    with pytest.raises(Backpressure, match="2 dead letters are waiting"):
        cache.write("user", 3, {"name": "good"})
    many = cache.write_many("user", {4: {"name": "good"}})
    assert list(many.refused) == ["4"] and not many.taken
    letters = list_dead(cache.redis, cache.keys, "user")
    assert discard(cache.redis, cache.keys, "user", letters[0].id)
    for key, name in ((3, "good"), (5, "poison"), (6, "after")):
        cache.write("user", key, {"name": name})
    blocked = flush_shard(h.context, "user", 0)  # 3 lands, 5 is the second letter, then stop
    assert blocked.status == "backoff" and "dead letters are waiting" in blocked.errors[0]
    assert sorted(h.rows("users")) == [3] and h.buffered() == 1
    assert discard(cache.redis, cache.keys, "user", letters[1].id)
    assert flush_shard(h.context, "user", 0).status == "done"
    assert sorted(h.rows("users")) == [3, 6] and h.buffered() == 0


def test_a_crash_before_the_batch_is_acknowledged_leaves_one_letter(
    pg_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flusher that dies after the database refused a row but before its batch was acknowledged leaves the batch pending; the next flush makes exactly one dead letter, which replays."""
    h = pg_harness
    _poison_setup(h)
    cache = h.cache
    cache.write("user", 1, {"name": "poison"})
    cache.write("user", 2, {"name": "fine"})
    real = WriteScripts.finish

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt("killed before finish.lua")

    monkeypatch.setattr(WriteScripts, "finish", crash)
    with pytest.raises(KeyboardInterrupt):
        flush_shard(h.context, "user", 0)
    assert count_dead(cache.redis, cache.keys, "user") == 0
    assert h.buffered() == 2
    monkeypatch.setattr(WriteScripts, "finish", real)
    h.context.lua.client.delete(h.context.keys.flush_lock("user", 0))  # the dead one's lock
    assert flush_shard(h.context, "user", 0).status == "done"
    (letter,) = list_dead(cache.redis, cache.keys, "user")
    assert letter.key == "1" and h.buffered() == 0 and sorted(h.rows("users")) == [2]
    _fix_table(h)
    assert replay(cache.redis, cache.keys, h.context.entity("user"), letter) != "superseded"
    assert flush_shard(h.context, "user", 0).status == "done"
    assert h.rows("users")[1]["name"] == "poison"


def test_a_write_racing_a_rejection_wins_and_its_letter_is_superseded(
    pg_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newer write of a key arriving after the database refused its row, before the batch settles, lands; the refused row is still a dead letter (nothing refused goes unrecorded), and replay calls it superseded."""
    h = pg_harness
    _poison_setup(h)
    cache = h.cache
    cache.write("user", 1, {"name": "poison"})
    real = SqlSink.apply

    def racing(self: SqlSink, ops: Any, fence: Any) -> Any:
        outcome = real(self, ops, fence)
        if outcome.rejected:
            cache.write("user", 1, {"name": "fixed"})
        return outcome

    monkeypatch.setattr(SqlSink, "apply", racing)
    assert flush_shard(h.context, "user", 0).status == "done"
    assert count_dead(cache.redis, cache.keys, "user") == 1
    assert cache.get("user", 1) == {"id": 1, "name": "fixed"}
    monkeypatch.setattr(SqlSink, "apply", real)
    assert flush_shard(h.context, "user", 0).status == "done"
    assert h.rows("users") == {1: {"id": 1, "name": "fixed"}}
    (letter,) = list_dead(cache.redis, cache.keys, "user")
    assert json.loads(letter.value) == {"id": 1, "name": "poison"}
    assert replay(cache.redis, cache.keys, h.context.entity("user"), letter) == "superseded"


def test_a_few_rows_bad_alike_in_one_batch_are_dead_lettered(harness: Harness) -> None:
    """Two rows of one batch that the database refuses with the same message (MariaDB's CHECK names no row) are dead-lettered as bad rows, not held as a table fault, and the rest lands."""
    h = harness
    _poison_setup(h)  # one shard: the three writes are one batch
    for key, name in ((1, "poison"), (2, "poison"), (3, "fine")):
        h.cache.write("user", key, {"name": name})
    _flush_all(h)
    assert sorted(letter.key for letter in _dead(h)) == ["1", "2"]
    assert set(h.rows("users")) == {3}


def test_dlq_shows_one_letter_in_full_and_drops_it(pg_harness: Harness) -> None:
    """`cachewarden dlq show --id` prints the dead letter as JSON with the database's error; `dlq drop --id` deletes it, and `dlq show` of it then exits 1."""
    h = pg_harness
    _setup(h)
    h.cache.write("user", 5, {"name": "poison"})
    _flush_all(h)
    [letter] = _dead(h)
    shown = _cli(h, "show", "user", "--id", letter.id, verb="dlq")
    assert shown.returncode == 0, shown.stderr
    full = json.loads(shown.stdout)
    assert full["id"] == letter.id and "no_poison" in full["error"] and full["key"] == "5"
    dropped = _cli(h, "drop", "user", "--id", letter.id, verb="dlq")
    assert dropped.returncode == 0 and "discarded" in dropped.stdout
    assert _dead(h) == []
    assert _cli(h, "show", "user", "--id", letter.id, verb="dlq").returncode == 1


def _letter_of(h: Harness, key: int, name: str = "poison", **row: Any) -> DeadLetter:
    """Write `key` with a row the table refuses, flush it: its dead letter."""
    h.cache.write("user", key, {"name": name, **row})
    for shard in range(shardcount.current(h.context, "user")):
        assert flush_shard(h.context, "user", shard).status == "done"
    return next(d for d in reversed(_dead(h)) if d.key == str(key))


def _mark_memory_full(h: Harness) -> None:
    """What enqueue.lua writes after finding Redis past its memory headroom (for 1 s)."""
    h.cache.redis.set(h.cache.keys.memory_mark(), "950000000 1000000000", px=5000)


def _bound_lowered(h: Harness) -> None:
    """Two more letters (three in all), then max_dead_letters lowered from 3 to 2."""
    _letter_of(h, 21)
    _letter_of(h, 22)
    h.configure({"user": USER}, {"user": {"shards": 1, "max_dead_letters": 2}})


REFUSALS = {
    # condition: (write_behind settings, make it hold, lift it, what both errors say)
    "the shard is full": (
        {"max_pending": 2, "batch_size": 1},
        lambda h: h.cache.write_many("user", {10: {"name": "a"}, 11: {"name": "b"}}),
        lambda h: _flush_all(h),
        r"shard 0 holds 2 unflushed writes \(write_behind\.max_pending\)",
    ),
    "Redis is past its memory headroom": (
        {},
        _mark_memory_full,
        lambda h: h.cache.redis.delete(h.cache.keys.memory_mark()),
        r"uses 906\.0 MB of its maxmemory 953\.7 MB, past the write headroom",
    ),
    "the entity would still hold max_dead_letters": (
        {},
        lambda h: _bound_lowered(h),
        lambda h: [discard(h.cache.redis, h.cache.keys, "user", d.id) for d in _dead(h)[1:]],
        r"\d dead letters are waiting \(the bound is write_behind\.max_dead_letters = 2\)",
    ),
}


@pytest.mark.parametrize("condition", list(REFUSALS))
def test_replay_is_refused_as_a_write_is(pg_harness: Harness, condition: str) -> None:
    """While the shard is full, Redis is past its memory headroom, or the entity would still hold max_dead_letters besides the letter, replay raises the Backpressure a write raises, takes nothing and keeps its letter; once that ends the letter replays."""
    h = pg_harness
    settings, hold, lift, says = REFUSALS[condition]
    h.create_table("users", version=False, extra=NO_POISON)
    h.configure({"user": USER}, {"user": {"shards": 1, "max_dead_letters": 3, **settings}})
    letter = _letter_of(h, 7)
    hold(h)
    with pytest.raises(Backpressure, match=says):
        h.cache.write("user", 8, {"name": "x"})
    pending = h.buffered()
    with pytest.raises(Backpressure, match=says):
        _replay(h, letter)
    assert letter.id in {d.id for d in _dead(h)} and h.buffered() == pending
    lift(h)
    _fix_table(h)
    assert _replay(h, letter) not in ("superseded", "")
    _flush_all(h)
    assert h.rows("users")[7]["name"] == "poison"


def test_a_replay_during_a_reshard_waits_and_then_goes_to_the_recorded_shard(
    pg_harness: Harness,
) -> None:
    """A replay while a reshard from 2 to 3 drains raises the writes' Backpressure and keeps its letter; afterwards the replay, from a config still saying 2, goes to the key's shard of 3 and lands."""
    h = pg_harness
    _setup(h)
    h.configure({"user": USER}, {"user": {"max_delay": "50ms", "shards": 2}})
    key = next(k for k in range(100) if shard_of(str(k), 3) != shard_of(str(k), 2))
    letter = _letter_of(h, key)
    _fix_table(h)
    refused: list[str] = []

    def during(line: str) -> None:
        if "draining" in line:
            with pytest.raises(Backpressure, match="resharded from 2 to 3") as caught:
                _replay(h, letter)
            refused.append(str(caught.value))

    reshard(h.context, "user", 3, say=during)
    assert refused and [d.id for d in _dead(h)] == [letter.id]
    assert h.context.entity("user").write_behind.shards == 2
    assert _replay(h, letter) != "superseded"
    keys = h.context.keys
    assert h.context.redis.xlen(keys.stream("user", shard_of(str(key), 3))) == 1
    assert h.context.redis.xlen(keys.stream("user", shard_of(str(key), 2))) == 0
    assert flush_shard(h.context, "user", shard_of(str(key), 3)).status == "done"
    assert h.rows("users")[key]["name"] == "poison"


def test_a_forced_replay_never_brings_back_a_row_a_newer_delete_removed(
    pg_harness: Harness,
) -> None:
    """A dead letter at version 3 of a key deleted at version 6 is dropped as superseded even by a forced replay (the delete's tombstone outranks it, as it outranks a write): the row stays deleted and the cache holds nothing of it."""
    h = pg_harness
    h.create_table("users", extra=NO_POISON)
    h.configure(
        {"user": {**USER, "version_column": "version"}},
        {"user": {"shards": 1, "max_delay": "50ms"}},
    )
    letter = _letter_of(h, 7, version=3)
    h.cache.delete("user", 7, version=6)
    _flush_all(h)
    _fix_table(h)
    assert 7 not in h.rows("users")  # an upsert of version 3 would insert it again
    with pytest.raises(Outranked):  # a write: outranked
        h.cache.write("user", 7, {"name": "late", "version": 3})
    assert _replay(h, letter, force=True) == "superseded"
    assert _dead(h) == [] and h.buffered() == 0
    _flush_all(h)
    assert 7 not in h.rows("users") and _cached(h, 7) is None


def test_discard_is_one_script_and_keeps_a_newer_letter_of_its_key_replayable(
    pg_harness: Harness,
) -> None:
    """Run apart, a discard's read and delete lose a newer letter of the key made between them (its replay then says superseded); `discard`, one script, deletes only its letter and leaves the newer one replayable."""
    h = pg_harness
    _poison_setup(h)
    redis, keys = h.cache.redis, h.cache.keys
    # The two steps of a discard run apart, a newer letter of key 1 made between them.
    old = _letter_of(h, 1)
    assert redis.hget(keys.dead_keys("user"), old.key) == old.id  # step 1: still its newest
    newer = _letter_of(h, 1, name="poison")
    redis.hdel(keys.dead_keys("user"), old.key)  # step 2, as the old discard did
    redis.xdel(keys.dead("user"), old.id)
    assert _replay(h, newer) == "superseded"  # the newer letter was lost
    # The script: a newer letter made before it (it cannot come between its steps).
    old = _letter_of(h, 2)
    newer = _letter_of(h, 2, name="poison")
    assert discard(redis, keys, "user", old.id) is True
    assert [d.id for d in _dead(h)] == [newer.id]
    assert discard(redis, keys, "user", old.id) is False
    _fix_table(h)
    assert _replay(h, newer) not in ("superseded", "")
    assert flush_shard(h.context, "user", 0).status == "done"
    assert h.rows("users")[2]["name"] == "poison"
