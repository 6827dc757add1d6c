"""A warm run in-process: every row cached once with a jittered TTL, never over a newer write, fenced."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import sqlalchemy as sa

from cachewarden.errors import WarmFailed
from cachewarden.warming import run as warm_run
from cachewarden.warming.run import ChunkResult, run_chunk, start_run, warm_scripts, warm_source
from cachewarden.warming.status import read_runs
from cachewarden.writebehind.flush import flush_shard
from tests.conftest import Harness
from tests.helpers import wait_for

USER = {"table": "users", "key": "id", "ttl": "10m"}
TTL_MS = 600_000


def fill_table(h: Harness, n: int, start: int = 1) -> None:
    """Rows id = start..start+n-1 with name "n<id>"."""
    rows = [{"id": i, "name": f"n{i}"} for i in range(start, start + n)]
    with h.engine.begin() as conn:
        for at in range(0, n, 5000):
            conn.execute(
                sa.text("INSERT INTO users (id, name) VALUES (:id, :name)"), rows[at : at + 5000]
            )


def setup(h: Harness, rows: int, **job: Any) -> None:
    h.create_table("users", version=False)
    fill_table(h, rows)
    h.configure(
        {"user": USER},
        {"user": {"shards": 2}},
        warming={"all": {"entity": "user", "every": "1h", "chunk_size": 1000, **job}},
    )


def entries(h: Harness) -> dict[str, tuple[dict[str, Any], int]]:
    """Every cache entry of `user`: key -> (row, pttl)."""
    redis = h.context.redis
    prefix = h.context.keys.entry_prefix("user")
    names = list(redis.scan_iter(prefix + "*", count=5000))
    with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.get(name)
            pipe.pttl(name)
        raw = pipe.execute()
    return {
        name[len(prefix) :]: (json.loads(raw[2 * i]), int(raw[2 * i + 1]))
        for i, name in enumerate(names)
    }


def test_a_multi_chunk_run_caches_every_row_with_a_jittered_ttl(harness: Harness) -> None:
    """12,345 rows in chunks of 1,000: each key cached once with its row, TTLs spread over the last 10% of the TTL, and the run recorded done with 13 chunks."""
    h = harness
    setup(h, 12_345)
    summary = start_run(h.context, "all")
    assert summary["state"] == "done" and summary["chunks"] == 13 and summary["rows"] == 12_345
    found = entries(h)
    assert len(found) == 12_345
    assert all(row == {"id": int(k), "name": f"n{k}"} for k, (row, _) in found.items())
    ttls = [pttl for _, pttl in found.values()]
    assert min(ttls) >= 0.9 * TTL_MS - 60_000 and max(ttls) <= TTL_MS
    # Spread, not one expiry: the TTLs fill most of the jitter window.
    assert max(ttls) - min(ttls) > 0.8 * 0.1 * TTL_MS
    _, last, _ = read_runs(h.context.redis, h.context.keys, "all")
    assert last is not None and last.complete and last["chunks_done"] == 13


def test_a_custom_query_warms_only_its_rows(harness: Harness) -> None:
    """A job's query (here: even ids) decides which rows are warmed, and its columns are what is cached."""
    h = harness
    setup(h, 3_000, query="SELECT id, name FROM users WHERE MOD(id, 2) = 0")
    assert start_run(h.context, "all")["rows"] == 1_500
    found = entries(h)
    assert sorted(int(k) for k in found) == list(range(2, 3_001, 2))


def test_a_query_without_the_key_column_fails_naming_the_job(harness: Harness) -> None:
    """A result without the key column fails the run with an error naming the job, the column and the setting."""
    h = harness
    setup(h, 10, query="SELECT name FROM users")
    with pytest.raises(WarmFailed) as caught:
        start_run(h.context, "all")
    message = str(caught.value)
    assert "'all'" in message and "'id'" in message and "warming.all.query" in message
    _, last, _ = read_runs(h.context.redis, h.context.keys, "all")
    assert last is not None and last.state == "failed" and "'id'" in last["error"]
    assert entries(h) == {}


def test_failing_sql_fails_the_run_with_the_databases_error(harness: Harness) -> None:
    """SQL that the database refuses fails the run with its error, and frees the job for its next run."""
    h = harness
    setup(h, 10, query="SELECT id, name FROM no_such_table")
    with pytest.raises(WarmFailed, match="no_such_table"):
        start_run(h.context, "all")
    assert not h.context.redis.exists(h.context.keys.run_lock("all"))


def test_a_pending_write_is_not_overwritten(harness: Harness) -> None:
    """A key whose write is still pending keeps the written value through a warm run, and the run counts it as skipped."""
    h = harness
    setup(h, 2_500)
    h.cache.write("user", 7, {"id": 7, "name": "written"})
    summary = start_run(h.context, "all")
    assert summary["state"] == "done"
    found = entries(h)
    assert found["7"][0]["name"] == "written" and found["7"][1] == -1  # pending: no TTL
    assert found["8"][0]["name"] == "n8"
    _, last, _ = read_runs(h.context.redis, h.context.keys, "all")
    assert last is not None and last["skipped"] == 1 and last["filled"] == 2_499


def _in_flight(h: Harness, between: Any) -> ChunkResult:
    """Run chunk 0 of a fresh run with `between()` called after its read, before its fill."""
    job = h.context.settings.job("all")
    scripts = warm_scripts(h.context, job)
    run, _ = scripts.start(5000, None, "", "test", job.timeout_ms)
    source = warm_source(h.context, job)

    def read() -> Any:
        chunk, _ = source.first(job.chunk_size)
        between(chunk)
        return chunk

    result = ChunkResult("all", run, 0, "test")
    warm_run._read_and_fill(h.context, job, run, 0, read, result)
    return result


def test_a_key_deleted_and_flushed_while_its_chunk_is_in_flight_stays_deleted(
    harness: Harness,
) -> None:
    """A key the chunk read, then deleted and flushed before the chunk's fill, is not brought back; its neighbours are filled."""
    h = harness
    setup(h, 50)
    seen: list[str] = []

    def delete_and_flush(chunk: Any) -> None:
        seen.extend(key for key, _ in chunk.rows)
        h.cache.delete("user", 5)
        for s in range(2):
            assert flush_shard(h.context, "user", s).status == "done"
        assert 5 not in h.rows("users")

    result = _in_flight(h, delete_and_flush)
    assert "5" in seen  # the chunk did read the row: a plain fill would bring it back
    found = entries(h)
    assert "5" not in found and "6" in found
    assert result.skipped == 1 and result.filled == 49


def test_a_key_written_and_flushed_while_its_chunk_is_in_flight_keeps_the_newer_value(
    harness: Harness,
) -> None:
    """A key written and flushed after the chunk read it keeps the written value, not the older row the chunk read."""
    h = harness
    setup(h, 50)

    def write_and_flush(chunk: Any) -> None:
        assert ("9", json.dumps({"id": 9, "name": "n9"}, separators=(",", ":"))) in chunk.rows
        h.cache.write("user", 9, {"id": 9, "name": "newer"})
        for s in range(2):
            assert flush_shard(h.context, "user", s).status == "done"

    _in_flight(h, write_and_flush)
    row, pttl = entries(h)["9"]
    assert row["name"] == "newer" and pttl > 0


def test_a_run_superseded_by_a_newer_one_writes_nothing(harness: Harness) -> None:
    """A run that paused past its lock while a newer run started fills nothing when it wakes (the run number fences it)."""
    h = harness
    setup(h, 20)
    redis, keys = h.context.redis, h.context.keys

    def newer_run_starts(chunk: Any) -> None:
        redis.delete(keys.run_lock("all"))  # the paused run's lock expired
        job = h.context.settings.job("all")
        assert warm_scripts(h.context, job).start(5000, None, "", "other", job.timeout_ms)[0] > 0

    result = _in_flight(h, newer_run_starts)
    assert result.state == "superseded" and result.filled == 0
    assert entries(h) == {}


def test_a_run_while_another_lives_is_skipped(harness: Harness) -> None:
    """A run asked for while the job's previous run still holds the lock is skipped, and counted as an overlap."""
    h = harness
    setup(h, 20)
    job = h.context.settings.job("all")
    first, _ = warm_scripts(h.context, job).start(5000, None, "", "first", job.timeout_ms)
    summary = start_run(h.context, "all")
    assert summary == {"job": "all", "slot_ms": None, "state": "skipped", "running": first}
    _, _, record = read_runs(h.context.redis, h.context.keys, "all")
    assert record["overlaps"] == "1"
    assert entries(h) == {}


def test_a_run_keeps_its_lock_while_its_chunks_wait_in_the_queue(
    pg_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose chunks wait in the queue past the run lock's TTL keeps its lock until they run: a run asked for meanwhile is skipped, and the queued chunks finish the run done."""
    h = pg_harness
    setup(h, 2_500)
    monkeypatch.setattr(warm_run, "RUN_LOCK_TTL_MS", 300)  # what a process keeps alive
    redis, lock = h.context.redis, h.context.keys.run_lock("all")
    queued: list[tuple[Any, ...]] = []
    kept_while_planning: list[int] = []

    def send(*chunk: Any) -> None:
        queued.append(chunk)
        kept_while_planning.append(int(redis.pttl(lock)))

    summary = start_run(h.context, "all", send=send)
    assert summary["state"] == "running" and len(queued) == 2
    assert max(kept_while_planning) <= 300  # the keeper's TTL: it lapses once nobody keeps it
    planned = time.monotonic()
    wait_for(lambda: time.monotonic() > planned + 0.6, 5, what="twice the keeper's TTL")
    assert redis.get(lock) == str(summary["run"])
    assert start_run(h.context, "all")["state"] == "skipped"
    states = [
        run_chunk(h.context, job, run, index, lo, hi)["state"]
        for job, run, index, lo, hi, _ in queued
    ]
    assert states == ["running", "done"]
    assert not redis.exists(lock)
    _, last, _ = read_runs(redis, h.context.keys, "all")
    assert last is not None and last["run"] == summary["run"] and last.complete
