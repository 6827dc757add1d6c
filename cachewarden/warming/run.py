"""A warming run: its lock and number, its first chunk, its plan, and its chunk tasks.

A run starts by taking the job's run lock and the next run number (the
fencing token); a run of the same job that still lives refuses it. The run
reads and fills its first `chunk_size` rows itself; if there are more, it
streams the keys after them and cuts them into keyset ranges, each sent as a
chunk task (`send`) to be read and filled by any worker, or run here when
there is no `send`. The last chunk to finish ends the run (`warm_end.lua`).

While a process works on a run, its keeper thread extends the run lock every
second; a run whose processes all died while planning loses its lock within
`RUN_LOCK_TTL_MS`, and the next due time starts a new run, whose number
fences off anything the old one still had in flight. Once planned, a run whose
chunks wait in the queue (where no process keeps it) holds its lock until its
deadline, its start plus the job's `timeout` (warm_end.lua): however long the
chunks wait, no newer run starts over it, and the last chunk releases it.

A chunk never overwrites an entry whose write is pending, nor one a flush
settled after the chunk began reading (see warm_fill.lua, finish.lua).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from cachewarden import metrics
from cachewarden.context import Context
from cachewarden.errors import BackendUnavailable, WarmFailed
from cachewarden.keys import shard_of
from cachewarden.scripts.warming import WarmScripts
from cachewarden.settings import WarmingJob
from cachewarden.warming.source import Chunk, WarmSource

log = structlog.get_logger("cachewarden.warming")

WARM_TASK = "cachewarden.warm"
CHUNK_TASK = "cachewarden.warm_chunk"

# A run's lock lives this long after the last process working on it stopped renewing.
RUN_LOCK_TTL_MS = 5000
KEEP_EVERY_S = 1.0
# The longest a chunk may take from its begin to its fill (and how long flushes keep
# recording the keys they settle after a chunk began).
MARK_HORIZON_MS = 600_000
FILL_ATTEMPTS = 3

# send(job, run, index, lo, hi, rows): hand one keyset range (lo < key <= hi) to a task
SendChunk = Callable[[str, int, int, str, "str | None", int], None]


@dataclass
class ChunkResult:
    """What one chunk did (a chunk task's result, as Flower shows it)."""

    job: str
    run: int
    chunk: int
    range: str
    rows: int = 0
    filled: int = 0
    skipped: int = 0  # a write was pending or newer
    invalid: int = 0  # rows that cannot be cached (named in the log)
    state: str = "running"


def warm_scripts(context: Context, job: WarmingJob) -> WarmScripts:
    """The context's scripts of one job."""
    shards = context.entity(job.entity).write_behind.shards
    return context.shared(
        f"warm_scripts:{job.name}",
        job.entity,
        lambda: WarmScripts(context.lua, context.keys, job.name, job.entity, shards),
    )


def warm_source(context: Context, job: WarmingJob) -> WarmSource:
    """The context's statements of one job (its entity's table reflected once)."""

    def build() -> WarmSource:
        try:
            table = context.table(job.entity)
        except BackendUnavailable as exc:
            raise WarmFailed(f"warming job {job.name!r}: {exc}") from exc
        return WarmSource(context.engine, job, table)

    return context.shared(f"warm_source:{job.name}", job.entity, build)


class Keeper:
    """A thread that extends the run locks this process works under, every second."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self._held: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def hold(self, job: WarmingJob, run: int) -> Iterator[None]:
        """Keep the run's lock while the block runs."""
        with self._lock:
            self._held[(job.name, run)] = self._held.get((job.name, run), 0) + 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="cachewarden-warm-keeper", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                left = self._held.pop((job.name, run)) - 1
                if left:
                    self._held[(job.name, run)] = left

    def _loop(self) -> None:
        while True:
            time.sleep(KEEP_EVERY_S)
            with self._lock:
                held = list(self._held)
            for name, run in held:
                try:
                    warm_scripts(self.context, self.context.settings.job(name)).keep(
                        run, RUN_LOCK_TTL_MS
                    )
                except Exception as exc:  # the next begin or fill tells the run
                    log.warning("warm_keep_failed", job=name, run=run, error=str(exc))


def keeper(context: Context) -> Keeper:
    """This context's keeper."""
    return context.shared("warm_keeper", "*", lambda: Keeper(context))


def start_run(
    context: Context,
    name: str,
    slot_ms: int | None = None,
    request: str = "",
    send: SendChunk | None = None,
) -> dict[str, Any]:
    """Run job `name` (for due time `slot_ms`, or on demand): its first chunk here, the
    rest sent as chunk tasks (or run here when `send` is None). Returns a summary;
    raises WarmFailed (the run recorded as failed) when its query fails."""
    job = context.settings.job(name)
    scripts = warm_scripts(context, job)
    run, other = scripts.start(RUN_LOCK_TTL_MS, slot_ms, request, context.consumer, job.timeout_ms)
    if run == -1:
        log.warning("warm_slot_already_run", job=name, slot_ms=slot_ms)
        return {"job": name, "slot_ms": slot_ms, "state": "skipped", "started_slot": other}
    if run == 0:
        log.warning("warm_run_skipped", job=name, slot_ms=slot_ms, running=other)
        return {"job": name, "slot_ms": slot_ms, "state": "skipped", "running": other}
    log.info("warm_run_started", job=name, run=run, slot_ms=slot_ms)
    with keeper(context).hold(job, run):
        try:
            context.replicate(f"warming job {name!r}: run number {run}")
            first = _first_chunk(context, job, run)
            if first.state != "running":
                return {"job": name, "run": run, "state": first.state}
            chunks, total = 1, first.rows
            if first.more_after is not None:
                planned = _plan(context, job, run, first.more_after, send)
                chunks, total = chunks + planned[0], total + planned[1]
            state = scripts.end(run, "planned", chunks, total)
        except WarmFailed as exc:
            scripts.end(run, "failed", str(exc))
            log.error("warm_run_failed", job=name, run=run, error=str(exc))
            _ended(context, job, "failed")
            raise
        except Exception as exc:  # the broker or Redis failed mid-plan: say so, if we can
            _fail_quietly(scripts, run, f"warming job {name!r}: {type(exc).__name__}: {exc}")
            raise
    if state != "running":
        log.info("warm_run_ended", job=name, run=run, state=state, rows=total)
        _ended(context, job, state)
    return {"job": name, "run": run, "state": state, "chunks": chunks, "rows": total}


def _ended(context: Context, job: WarmingJob, outcome: str) -> None:
    """Report a run that ended, with its duration (from its record)."""
    if outcome not in ("done", "failed"):
        return
    started, finished = context.redis.hmget(
        context.keys.last_run(job.name), ["started_ms", "finished_ms"]
    )
    if started and finished:
        metrics.emit(
            "warm_runs", (int(finished) - int(started)) / 1000, job=job.name, outcome=outcome
        )


def _fail_quietly(scripts: WarmScripts, run: int, problem: str) -> None:
    """Record the run as failed where Redis still answers (else its lock lapses)."""
    log.error("warm_run_failed", run=run, error=problem)
    try:
        scripts.end(run, "failed", problem)
    except Exception as exc:
        log.warning("warm_run_not_recorded", run=run, error=str(exc))


@dataclass
class _First(ChunkResult):
    more_after: str | None = None  # the first chunk's last key, when more rows follow


def _first_chunk(context: Context, job: WarmingJob, run: int) -> _First:
    """Read and fill the first chunk_size rows (chunk 0)."""
    source = warm_source(context, job)
    result = _First(job.name, run, 0, "start")

    def read() -> Chunk:
        chunk, more = source.first(job.chunk_size)
        result.more_after = chunk.last_key if more else None
        return chunk

    _read_and_fill(context, job, run, 0, read, result)
    result.range = f"..{result.more_after}" if result.more_after else "all"
    return result


def _plan(
    context: Context, job: WarmingJob, run: int, after: str, send: SendChunk | None
) -> tuple[int, int]:
    """Cut the keys after `after` into chunks, each sent (or run here): (chunks, rows)."""
    source = warm_source(context, job)
    size = job.chunk_size

    def dispatch(index: int, lo: str, hi: str | None, rows: int) -> None:
        if send is None:
            run_chunk(context, job.name, run, index, lo, hi)
        else:
            send(job.name, run, index, lo, hi, rows)

    chunks, total, count, lo = 0, 0, 0, after
    for value in source.keys_after(after):
        count += 1
        if count == size:
            chunks += 1
            hi = source.key_of(value)
            dispatch(chunks, lo, hi, count)
            total, count, lo = total + count, 0, hi
    if count:
        chunks += 1
        dispatch(chunks, lo, None, count)
        total += count
    return chunks, total


def run_chunk(
    context: Context, name: str, run: int, index: int, lo: str, hi: str | None
) -> dict[str, Any]:
    """Read and fill one keyset range (lo < key <= hi) of run `run`; end the run when it
    was the last chunk. Raises WarmFailed (the run recorded as failed) when the query
    fails."""
    job = context.settings.job(name)
    scripts = warm_scripts(context, job)
    source = warm_source(context, job)
    result = ChunkResult(name, run, index, f"{lo}..{'' if hi is None else hi}")
    with keeper(context).hold(job, run):
        try:
            _read_and_fill(context, job, run, index, lambda: source.chunk(lo, hi), result)
        except WarmFailed as exc:
            scripts.end(run, "failed", str(exc))
            log.error("warm_run_failed", job=name, run=run, chunk=index, error=str(exc))
            _ended(context, job, "failed")
            raise
        if result.state == "running":
            result.state = scripts.end(run, "check")
            if result.state != "running":
                log.info("warm_run_ended", job=name, run=run, state=result.state)
                _ended(context, job, result.state)
    return asdict(result)


def _read_and_fill(
    context: Context,
    job: WarmingJob,
    run: int,
    index: int,
    read: Callable[[], Chunk],
    result: ChunkResult,
) -> None:
    """Begin, read, fill; read again if the marking lapsed meanwhile (rare)."""
    scripts = warm_scripts(context, job)
    spec = context.entity(job.entity)
    ttl = job.ttl_ms or spec.ttl_ms
    span = ttl * job.ttl_jitter
    base = ttl - span + spec.stale_ttl_ms
    shards = spec.write_behind.shards
    for _ in range(FILL_ATTEMPTS):
        ok, begun = scripts.begin(run, RUN_LOCK_TTL_MS, MARK_HORIZON_MS)
        if not ok:
            if begun == "timeout":
                problem = f"warming job {job.name!r}: run {run} outlived its timeout"
                scripts.end(run, "failed", f"{problem} ({job.timeout_ms} ms)")
                begun = "failed"
            result.state = str(begun)
            return
        chunk = read()
        rnd = random.random
        rows = [
            (key, value, int(base + rnd() * span), shard_of(key, shards))
            for key, value in chunk.rows
        ]
        for problem in chunk.invalid:
            log.warning("warm_row_not_cached", job=job.name, error=problem)
        filled, skipped, _ = scripts.fill(
            run, int(begun), MARK_HORIZON_MS, index, rows, len(chunk.invalid)
        )
        if filled == -1:
            result.state = "superseded"
            return
        if filled >= 0:
            metrics.emit("warm_rows", len(rows), job=job.name)
            result.rows = len(rows) + len(chunk.invalid)
            result.filled, result.skipped, result.invalid = filled, skipped, len(chunk.invalid)
            return
    raise WarmFailed(
        f"warming job {job.name!r}: chunk {index} could not be filled in "
        f"{FILL_ATTEMPTS} attempts (each took over {MARK_HORIZON_MS} ms)"
    )
