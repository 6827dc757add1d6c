"""Write-behind through crashes: a SIGKILLed worker, a paused flusher, a Redis restart.

Real servers and real processes throughout: the worker is a real Celery worker,
the paused flusher a separate Python process stopped with SIGSTOP at a chosen
point of its flush, the Redis a private redis-server with AOF.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachewarden.writebehind.flush import FlushResult, flush_shard
from tests.conftest import Harness
from tests.helpers import REPO, WorkerProcess, wait_for
from tests.servers import PrivateRedis

USER = {"table": "users", "key": "id", "ttl": "10m"}


# -- reading the buffer's state ----------------------------------------------------------


def _streams(h: Harness) -> list[str]:
    assert h.settings is not None
    shards = h.settings.entities["user"].write_behind.shards
    return [h.cache.keys.stream("user", s) for s in range(shards)]


def _locked(h: Harness) -> int:
    """Shards whose flush lock some flusher holds (it is in the middle of draining them)."""
    assert h.settings is not None
    shards = h.settings.entities["user"].write_behind.shards
    locks = [h.cache.keys.flush_lock("user", s) for s in range(shards)]
    return int(h.cache.redis.exists(*locks))


def _buffered(h: Harness) -> int:
    """Entries still in the shard streams."""
    return sum(int(h.cache.redis.xlen(stream)) for stream in _streams(h))


def _dirty(h: Harness) -> int:
    """Keys whose newest write is not yet known to be flushed."""
    assert h.settings is not None
    shards = h.settings.entities["user"].write_behind.shards
    return sum(int(h.cache.redis.hlen(h.cache.keys.dirty("user", s))) for s in range(shards))


def _drained(h: Harness) -> bool:
    return _buffered(h) == 0 and _dirty(h) == 0


def _wait_drained(h: Harness, timeout: float) -> None:
    """Wait until the buffer is empty; on timeout, say what is left and what the workers said."""
    try:
        wait_for(lambda: _drained(h), timeout, what="the buffer to drain")
    except AssertionError as exc:
        state = f"buffered={_buffered(h)} locked={_locked(h)} dirty={_dirty(h)}"
        said = "".join(w.output()[-3000:] for w in h.workers)
        raise AssertionError(f"{exc}: {state}\n{said}") from None


def _names(h: Harness) -> dict[int, str]:
    return {key: row["name"] for key, row in h.rows("users").items()}


# -- 1. a worker SIGKILLed in the middle of a batch ---------------------------------------

KEYS = 2_500
WRITES = 20_000


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _freeze_mid_batch(h: Harness, worker: WorkerProcess, timeout: float = 60) -> int:
    """SIGSTOP the worker and its pool while it holds a shard's flush lock with entries
    in the stream; return how many locks it holds.

    Freezes, looks, and thaws again until the frozen worker is caught in the middle of
    a drain (between taking a shard and letting it go), so the SIGKILL that follows is
    certain to land in the middle of one.
    """
    assert worker.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [worker.proc.pid, *worker.children()]
        _signal_all(pids, signal.SIGSTOP)
        locked = _locked(h)
        if locked > 0 and _buffered(h) > 0:
            return locked
        _signal_all(pids, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the worker was never caught holding a flush lock")


class RegressionWatch:
    """Samples the table while it fills and records any key whose value went backwards."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.seen: dict[int, int] = {}
        self.regressions: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RegressionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for key, name in _names(self.h).items():
                counter = int(name[1:])
                if counter < self.seen.get(key, -1):
                    self.regressions.append(f"key {key}: {name} after v{self.seen[key]}")
                self.seen[key] = max(counter, self.seen.get(key, -1))
            self.samples += 1


def test_worker_sigkilled_mid_batch_then_restarted(harness: Harness) -> None:
    """A worker SIGKILLed mid-batch and replaced loses no write and never lets a key go back."""
    h = harness
    h.create_table("users", version=False)
    h.configure(
        {"user": USER},
        {"user": {"max_delay": "100ms", "batch_size": 250, "shards": 4, "lock_ttl": "2s"}},
    )
    first = h.worker(concurrency=2)
    last: dict[int, str] = {}

    def produce() -> None:
        # No version column: only the pipeline's per-key order keeps the last write.
        for i in range(WRITES):
            h.cache.write("user", i % KEYS, {"name": f"v{i}"})
            last[i % KEYS] = f"v{i}"

    producer = threading.Thread(target=produce)
    with RegressionWatch(h) as watch:
        producer.start()
        wait_for(lambda: h.count("users") > 0, 60, what="the first flushed rows")
        claimed = _freeze_mid_batch(h, first)
        assert _buffered(h) > 0
        first.kill()
        assert _locked(h) >= 1 and claimed >= 1  # the dead worker's locks outlive it
        h.worker(concurrency=2)
        producer.join(120)
        assert not producer.is_alive()
        _wait_drained(h, 120)
    assert watch.samples > 0
    assert watch.regressions == []
    assert h.count("users") == KEYS
    assert _names(h) == last


# -- 2. a flusher paused past its lock --------------------------------------------------

# Flusher A: a separate process that flushes one shard and stops itself (SIGSTOP)
# at the named point, exactly as a GC pause or a descheduled VM would stop it.
FLUSHER_A = """
import json, os, signal, sys
from cachewarden.scripts import Registry
from cachewarden.writebehind import flush
from cachewarden.writebehind.fence import Fence
from cachewarden.logs import configure_logging
from cachewarden.context import Context
from cachewarden.settings import load_settings

config, entity, shard, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
configure_logging(fmt="json")

def stop():
    os.kill(os.getpid(), signal.SIGSTOP)

read, check, send = flush.committed_token, Fence.check, Registry.send

def told_send(self, *parts):
    print("READ-AHEAD " + " ".join(map(str, parts)), flush=True)
    return send(self, *parts)

Registry.send = told_send

def paused_read(*args):
    stop()
    return read(*args)

def check_then_pause(self, conn):
    check(self, conn)
    stop()

def pause_then_check(self, conn):
    stop()
    check(self, conn)

if pause == "before-fence-read":
    flush.committed_token = paused_read
elif pause == "before-fence-check":
    Fence.check = pause_then_check
elif pause == "before-commit":
    Fence.check = check_then_pause
result = flush.flush_shard(Context.build(load_settings(config)), entity, shard)
print("RESULT " + json.dumps(result.__dict__), flush=True)
"""


def _state(pid: int) -> str:
    """The process state letter from /proc (T: stopped)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def flusher_a(harness: Harness) -> Iterator[list[subprocess.Popen[str]]]:
    """Flusher A processes started by a test; killed at teardown."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _start_paused(
    config: Path, procs: list[subprocess.Popen[str]], pause: str
) -> subprocess.Popen[str]:
    """Start flusher A on shard 0 and wait until it has stopped itself at `pause`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FLUSHER_A, str(config), "user", "0", pause],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)

    def stopped() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"flusher A ended before pausing: {proc.communicate()}")
        return _state(proc.pid) == "T"

    wait_for(stopped, 60, what=f"flusher A to pause {pause}")
    return proc


def _resume(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    """SIGCONT flusher A and return its FlushResult as a dict, and what it printed."""
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"flusher A failed: {out}{err}"
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result, out


@pytest.mark.parametrize("pause", ["before-fence-read", "before-fence-check", "before-commit"])
def test_flusher_paused_past_its_lock_cannot_overwrite_a_newer_value(
    harness: Harness, flusher_a: list[subprocess.Popen[str]], pause: str
) -> None:
    """A flusher paused past its lock TTL in its first full batch (its next read already
    sent) and resumed after newer values of its keys were flushed ends fenced off, and
    the newer values stay in the database and the cache."""
    h = harness
    h.create_table("users", version=False)  # no version guard: only the fence protects v2
    # A's lock lasts 1 s; B's outlasts its wait for A's fence row in "before-commit".
    # Batches of 2 over 4 keys: A's first batch is full, so its next read goes out ahead.
    # SQLite locks the whole file: A's second batch and B would only deadlock on it
    # (SQLITE_BUSY), so there A takes all 4 keys in one batch, as a SQLite deployment's
    # one writer does.
    batch = 1000 if h.dialect == "sqlite" else 2
    write_behind = {"shards": 1, "lock_ttl": "1s", "max_delay": "1h", "batch_size": batch}
    h.configure({"user": USER}, {"user": write_behind})
    a_config = h.tmp_path / "flusher-a.toml"
    a_config.write_text(h.config_path.read_text())
    h.configure({"user": USER}, {"user": {**write_behind, "lock_ttl": "60s"}})
    for key in (1, 2, 3, 4):
        h.cache.write("user", key, {"name": "v1"})
    a = _start_paused(a_config, flusher_a, pause)
    lock = h.cache.keys.flush_lock("user", 0)
    wait_for(lambda: not h.cache.redis.exists(lock), 30, what="A's lock to expire")
    h.cache.write("user", 1, {"name": "v2"})  # in A's batch
    h.cache.write("user", 3, {"name": "v2"})  # in the batch A read ahead

    # Flusher B takes the shard over. Paused before commit, A holds the fence row
    # (and its v1 upsert) uncommitted: B must wait for A, then commit v2 after it.
    b_result: list[FlushResult] = []
    b = threading.Thread(target=lambda: b_result.append(flush_shard(h.context, "user", 0)))
    b.start()
    b.join(60 if pause != "before-commit" else 1.5)
    if pause == "before-commit":
        assert b.is_alive(), "B committed while A held the shard's fence"
    a_result, a_said = _resume(a)
    b.join(60)
    assert not b.is_alive()

    if batch == 2 and pause != "before-fence-read":  # A was paused inside its first batch
        assert "READ-AHEAD XRANGE" in a_said  # its next read was on its way
    assert a_result["status"] == "fenced", a_result
    # Paused before commit, A's first batch committed first (B waited on it); otherwise
    # nothing of A's; its read-ahead batch never lands.
    assert a_result["applied"] == (min(batch, 4) if pause == "before-commit" else 0), a_result
    assert b_result[0].status == "done", b_result
    assert _names(h) == {1: "v2", 2: "v1", 3: "v2", 4: "v1"}
    for key in (1, 3):
        entry = h.cache.keys.entry("user", str(key))
        assert json.loads(h.cache.redis.get(entry) or "null") == {"id": key, "name": "v2"}
        assert h.cache.redis.pttl(entry) > 0  # flushed, so it expires again
    assert _drained(h)


# -- 3. Redis restarted on its AOF -----------------------------------------------------

RESTART_KEYS = 1_000
RESTART_WRITES = 5_000


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["shutdown", "sigkill"])
def test_buffered_writes_survive_a_redis_restart_with_aof(pg_harness: Harness, stop: int) -> None:
    """Writes buffered before Redis stops (shut down or SIGKILLed) all land after it restarts."""
    h = pg_harness
    h.create_table("users", version=False)
    with PrivateRedis() as server:
        h.configure({"user": USER}, {"user": {"max_delay": "100ms"}}, redis_url=server.url)
        last: dict[int, str] = {}
        for i in range(RESTART_WRITES):
            h.cache.write("user", i % RESTART_KEYS, {"name": f"v{i}"})
            last[i % RESTART_KEYS] = f"v{i}"
        server.restart(stop)
        assert _buffered(h) == RESTART_WRITES
        assert h.count("users") == 0
        worker = h.worker(concurrency=2)
        try:
            _wait_drained(h, 90)
        finally:
            worker.stop()
    assert h.count("users") == RESTART_KEYS
    assert _names(h) == last
