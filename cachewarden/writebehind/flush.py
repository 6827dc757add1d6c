"""Flushing one shard of the write buffer into the database (the core, no Celery).

One flusher per shard, admitted by a Redis lock that carries a fencing token. The
shard's stream holds exactly the operations not yet settled: the lock holder reads it
from its head with a cursor (`XRANGE`, safe to send again: a lost reply strands
nothing), coalesces each batch, applies it in one fenced transaction, dead-letters
the rows the database refused (trying each key's next-newest operation in place of a
refused one), and only then deletes the batch's entries (finish.lua). Entries of keys
whose rows another transaction holds locked stay, and so does everything after a
crash: the next holder reads them again from the head.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.exceptions import RedisError

from cachewarden import metrics
from cachewarden.context import Context
from cachewarden.errors import BackendUnavailable, ConfigError, LockLost
from cachewarden.scripts import InFlight
from cachewarden.scripts.writebehind import Finishing, WriteScripts
from cachewarden.settings import EntitySettings
from cachewarden.writebehind import shardcount
from cachewarden.writebehind.backoff import backoff_ms
from cachewarden.writebehind.coalesce import DELETE, WRITE, Op, coalesce
from cachewarden.writebehind.enqueue import write_scripts
from cachewarden.writebehind.fence import Fence, committed_token
from cachewarden.writebehind.sink import Outcome, Rejected, SqlSink

log = structlog.get_logger("cachewarden.flush")


@dataclass
class Batch:
    """What one stream read returned: every entry's id, in stream order, and its Op."""

    ids: list[str]
    ops: list[Op]


@dataclass
class _Applied:
    """A batch the database took: what finish.lua deletes and settles."""

    ids: list[str]
    ops: list[Op]
    winners: list[Op]
    outcome: Outcome
    # Keys of which the database refused an operation: the operation applied in its
    # place (None: none was left, or it was a delete).
    fallback: dict[str, Op | None] = field(default_factory=dict)


@dataclass
class _Sent:
    """A batch whose finish.lua was sent and not yet read."""

    applied: _Applied
    call: Finishing


class _DeadLettersFull(Exception):
    """The entity holds max_dead_letters: the shard takes no new batch."""


@dataclass
class FlushResult:
    """What one flush did."""

    entity: str
    shard: int
    status: str = "done"  # done | busy | backoff | fenced
    entries: int = 0
    applied: int = 0
    rejected: int = 0
    locked: int = 0  # keys left pending because another transaction holds their row
    batches: int = 0
    retry_in_ms: int = 0
    errors: list[str] = field(default_factory=list)


def sink_for(context: Context, entity: str) -> SqlSink:
    """The context's SQL sink of `entity`, built (and its table reflected) once per process."""
    spec = context.entity(entity)
    return context.shared(
        "sink",
        entity,
        lambda: SqlSink(
            context.engine, spec, context.table(entity), lambda: context.reflect_again(entity)
        ),
    )


@dataclass
class ShardFlusher:
    """Flushes one shard while holding its lock."""

    context: Context
    spec: EntitySettings
    shard: int
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Keys whose rows were locked by another transaction during this run: every entry of
    # theirs stays pending (in stream order) for the next run, never applied out of order.
    held: set[str] = field(default_factory=set)
    # The oldest entry this run left in the stream for a held key ("" for none): the
    # trims of later batches stop below it.
    kept: str = ""
    # During a drain: the batches whose finish.lua was sent and not yet read, how to
    # read them, and the dead letters the last one read found (-1: not known yet).
    _sent: list[_Sent] = field(default_factory=list, init=False, repr=False)
    _settle_sent: Callable[[], None] = field(default=lambda: None, init=False, repr=False)
    _dead_letters: int = field(default=-1, init=False, repr=False)
    _pinned: WriteScripts | None = field(default=None, init=False, repr=False)

    @property
    def _stream(self) -> str:
        return self.context.keys.stream(self.spec.name, self.shard)

    @property
    def _scripts(self) -> WriteScripts:
        """The write scripts of the shard count this run started on (one per run: a
        reshard recorded meanwhile changes the next run's, never a batch's)."""
        if self._pinned is None:
            self._pinned = write_scripts(self.context, self.spec.name)
        return self._pinned

    def run(self, budget_ms: int) -> FlushResult:
        """Drain the shard for up to `budget_ms`, then release it."""
        result = FlushResult(self.spec.name, self.shard)
        token = self._acquire()
        if token == 0:
            result.status = "busy"
            return result
        hold_ms = 0
        try:
            self.context.replicate(f"{self.spec.name}:{self.shard}: the flush lock's token")
            fence = self._fence(token)
            sink = sink_for(self.context, self.spec.name)
            self._drain(sink, fence, result, time.monotonic() + budget_ms / 1000)
            self.context.redis.delete(self.context.keys.retries(self.spec.name, self.shard))
            if self.held:
                # Try the locked rows again after one lock wait (not a growing backoff:
                # a held lock is contention, and they land as soon as it is released).
                hold_ms = self.spec.write_behind.lock_wait_ms
                result.retry_in_ms = hold_ms
                log.warning("flush_rows_locked", keys=len(self.held), retry_in_ms=hold_ms)
        except _DeadLettersFull as exc:
            hold_ms = self._backoff()
            result.status, result.retry_in_ms = "backoff", hold_ms
            result.errors.append(str(exc))
            log.error("flush_blocked", error=str(exc), retry_in_ms=hold_ms)
        except LockLost as exc:
            result.status = "fenced"
            result.errors.append(str(exc))
            log.warning("flush_fenced", error=str(exc))
        except (BackendUnavailable, ConfigError) as exc:
            hold_ms = self._backoff()
            result.status, result.retry_in_ms = "backoff", hold_ms
            result.errors.append(str(exc))
            log.error("flush_failed", error=str(exc), retry_in_ms=hold_ms)
        except RedisError:
            raise
        except Exception as exc:  # a bug, not an outage: back off rather than spin on it
            hold_ms = self._backoff()
            result.status, result.retry_in_ms = "backoff", hold_ms
            result.errors.append(repr(exc))
            log.exception("flush_crashed", retry_in_ms=hold_ms)
        finally:
            self._release(hold_ms)
        return result

    # -- lock, fence, backoff ---------------------------------------------------

    def _acquire(self) -> int:
        token = self._scripts.lock_acquire(self.shard, self.owner)
        if token:
            self._extend()
        return token

    def _extend(self) -> None:
        if not self._scripts.lock_extend(self.shard, self.owner):
            raise LockLost(
                f"{self.spec.name}:{self.shard}: the flush lock expired "
                "(a newer flusher may hold it)"
            )

    def _fence(self, token: int) -> Fence:
        """Our fence; if the database saw a higher token (Redis lost its counter), jump past it."""
        name = f"{self.context.keys.prefix}:{self.spec.name}:{self.shard}"
        committed = committed_token(self.context.engine, name)
        if committed >= token:
            counter = self.context.keys.flush_fence(self.spec.name, self.shard)
            token = int(self.context.redis.incrby(counter, committed - token + 1))
            # Only the lock's holder may jump: a flusher paused past its lock (the
            # higher token is its successor's) must not come back above it.
            self._extend()
        return Fence(name, token)

    def _backoff(self) -> int:
        wb = self.spec.write_behind
        attempt = int(
            self.context.redis.incr(self.context.keys.retries(self.spec.name, self.shard))
        )
        return backoff_ms(attempt, wb.retry_base_ms, wb.retry_max_ms)

    def _release(self, hold_ms: int) -> None:
        self._scripts.release(self.shard, self.owner, hold_ms)

    # -- reading and applying -----------------------------------------------------

    def _drain(self, sink: SqlSink, fence: Fence, result: FlushResult, deadline: float) -> None:
        """Apply batch after batch. A batch's finish.lua runs in Redis while the next
        batch, read ahead, goes to the database; its reply (the lock still ours? the dead
        letters held?) is read before the next finish is sent, before any read not made
        ahead and before a dead-letter check it could change, so a flusher that lost its
        lock reads nothing more, and all are read before it lets the shard go."""
        self._dead_letters, self._sent = -1, []

        def settle() -> None:
            while self._sent:
                self._settle(self._sent.pop(), fence, result)

        self._settle_sent = settle
        try:
            for batch in self._batches(deadline, settle):
                applied = self._apply(batch, sink, fence)
                settle()
                self._sent.append(self._finish(applied))
                if time.monotonic() >= deadline:
                    break
        finally:
            settle()

    def _batches(self, deadline: float, before_read: Callable[[], None]) -> Iterator[Batch]:
        """The stream from its head, in batches, with a cursor (`XRANGE`): the entries
        an earlier holder left (a crash, a lost lock, a held row) come first, as they
        are the oldest. A read is safe to send again: it changes nothing.

        Read with the script registry's direct commands: hiredis parses the reply, and
        each entry's fields become an Op in one step (no redis-py response callback).
        While a full batch is applied, the next read is already on its way (sent
        before the batch is yielded, its reply read after); any other read first calls
        `before_read`."""
        lua, size, stream = self.context.lua, self.spec.write_behind.batch_size, self._stream
        start = "-"
        ahead: InFlight | None = None
        try:
            while True:
                if ahead is None:
                    before_read()
                    entries: list[Any] = lua.command("XRANGE", stream, start, "+", "COUNT", size)
                else:
                    entries, ahead = ahead.reply(), None
                if not entries:
                    return
                self._check_dead_letters()  # what it read stays in the stream
                start = "(" + entries[-1][0]
                if len(entries) == size and time.monotonic() < deadline:
                    ahead = lua.send("XRANGE", stream, start, "+", "COUNT", size)
                yield _batch(entries)
        finally:
            if ahead is not None:  # stopped early: what it read stays in the stream
                ahead.cancel()

    def _check_dead_letters(self) -> None:
        """Take no new batch while the entity holds max_dead_letters (nothing is dropped)."""
        bound = self.spec.write_behind.max_dead_letters
        # A finish still running may add a letter per row its batch had refused.
        if self._dead_letters + sum(len(s.applied.outcome.rejected) for s in self._sent) >= bound:
            self._settle_sent()
        held = self._dead_letters
        if held < 0:
            held = int(self.context.redis.xlen(self.context.keys.dead(self.spec.name)))
        if held >= bound:
            raise _DeadLettersFull(
                f"{self.spec.name}: {held} dead letters are waiting (write_behind."
                f"max_dead_letters = {bound}); flushing resumes once they are replayed or "
                f"discarded: cachewarden dead-letters list {self.spec.name}"
            )

    def _apply(self, batch: Batch, sink: SqlSink, fence: Fence) -> _Applied:
        """Coalesce the batch and apply it to the database (one fenced transaction), then
        each refused key's next-newest operation in its place (`_fall_back`). A key with
        a partial write among several operations is not coalesced: its operations go to
        the database one after another (`_in_turn`)."""
        ids, ops, held = batch.ids, batch.ops, self.held
        live = [op for op in ops if op.key not in held] if held else ops
        fallback: dict[str, Op | None] = {}
        apart = _keys_in_turn(live)
        if apart:
            turns = [op for op in live if op.key in apart]
            live = [op for op in live if op.key not in apart]
        winners = coalesce(live)
        outcome = sink.apply(winners, fence) if winners else Outcome()
        if outcome.rejected:
            outcome = self._fall_back(live, outcome, fallback, sink, fence)
        if apart:
            last, more = self._in_turn(turns, fallback, sink, fence)
            winners += last
            outcome = outcome + more
        held.update(op.key for op in outcome.locked)
        if held:  # what is held stays in the stream: not deleted, not settled
            kept = [op.id for op in ops if op.key in held]
            if kept and not self.kept:
                self.kept = kept[0]
            keep = set(kept)
            ids = [sid for sid in ids if sid not in keep]
            ops = [op for op in ops if op.key not in held]
            winners = [op for op in winners if op.key not in held]
            outcome.rejected = [bad for bad in outcome.rejected if bad.op.key not in held]
            for key in list(fallback):
                if key in held:
                    del fallback[key]
        return _Applied(ids, ops, winners, outcome, fallback)

    def _in_turn(
        self, ops: list[Op], fallback: dict[str, Op | None], sink: SqlSink, fence: Fence
    ) -> tuple[list[Op], Outcome]:
        """Apply the keys' operations one after another: the first of each key, then the
        second, and so on (one transaction per turn). Returns each key's last operation
        and what the turns did; a key of which one was refused or outranked is settled by
        dropping its entry (`fallback` None), so a read loads what the database holds."""
        by_key: dict[str, list[Op]] = {}
        for op in ops:
            by_key.setdefault(op.key, []).append(op)
        total = Outcome()
        for turn in range(max(len(mine) for mine in by_key.values())):
            batch = [mine[turn] for mine in by_key.values() if len(mine) > turn]
            total = total + sink.apply(batch, fence, judge_alike=False)
        for bad in total.rejected:
            fallback[bad.op.key] = None
        for op in total.stale:
            fallback[op.key] = None
        return [mine[-1] for mine in by_key.values()], total

    def _fall_back(
        self,
        ops: list[Op],
        outcome: Outcome,
        fallback: dict[str, Op | None],
        sink: SqlSink,
        fence: Fence,
    ) -> Outcome:
        """Where the database refused a key's surviving operation, apply the survivor of
        the key's other operations in the batch in its place, and so on back: the
        database ends with the newest operation it accepts (invariant 3a). `fallback`
        gets, per refused key, what was applied in the end (None: nothing was)."""
        refused = {bad.op.id for bad in outcome.rejected}
        keys = {bad.op.key for bad in outcome.rejected}
        by_key: dict[str, list[Op]] = {}
        for op in ops:
            if op.key in keys:
                by_key.setdefault(op.key, []).append(op)
        total = outcome
        while keys:
            retry: list[Op] = []
            for key in keys:
                survivors = coalesce(op for op in by_key[key] if op.id not in refused)
                fallback[key] = survivors[0] if survivors else None
                retry += survivors
            if not retry:
                break
            more = sink.apply(retry, fence, judge_alike=False)
            total = total + more
            refused.update(bad.op.id for bad in more.rejected)
            keys = {bad.op.key for bad in more.rejected}
        return total

    def _finish(self, applied: _Applied) -> _Sent:
        """Send the script that deletes the batch's entries, settles its keys and moves
        its refused operations to the dead-letter stream (one script: a crash leaves all
        of it or none), and extends the shard's lock."""
        ops, outcome = applied.ops, applied.outcome
        # Each key's newest entry in the batch: the id its settling is judged by.
        written = {op.key: op.id for op in ops}
        # The keys not settled as plain writes (usually none): deletes, outranked writes
        # and keys of which the database refused an operation.
        kind = {op.key: op.kind for op in applied.winners if op.kind != WRITE}
        stale = {op.id for op in outcome.stale}
        for op in outcome.stale:
            kind[op.key] = f"s:{op.version}:{self.spec.version_column}"
        values: dict[str, str] = {}
        for key, used in applied.fallback.items():
            if used is None or used.kind == DELETE or used.id in stale or used.partial:
                kind[key] = "x"
            else:
                kind[key] = "v"
                values[key] = used.value
        others = [(key, sid, kind[key]) for key, sid in written.items() if key in kind]
        for key in kind:
            written.pop(key, None)
        # Oldest first: finish.lua records the last letter of a key as its newest.
        letters = [_letter(bad) for bad in sorted(outcome.rejected, key=_stream_order)]
        call = self._scripts.finish(
            self.shard,
            applied.ids,
            written,
            others,
            letters,
            self.owner,
            kept=self.kept,
            values=[values[key] for key, _, op in others if op == "v"],
        )
        return _Sent(applied, call)

    def _settle(self, sent: _Sent, fence: Fence, result: FlushResult) -> None:
        """Read what a batch's finish.lua did, and count the batch."""
        finished = sent.call.result()
        applied = sent.applied
        lost = sum(1 for used in applied.fallback.values() if used is None)
        done = len(applied.winners) - lost
        metrics.emit("flush_batch_rows", len(applied.ids), entity=self.spec.name)
        result.entries += len(applied.ids)
        result.applied += done
        result.rejected += finished.dead
        result.locked = len(self.held)
        result.batches += 1
        log.info(
            "flush_batch",
            batch_size=len(applied.ids),
            applied=done,
            rejected=len(applied.outcome.rejected),
            dead_letters=finished.dead,
            locked=len(applied.outcome.locked),
            fence=fence.token,
        )
        # finish.lua extended the lock and counted the dead letters (no round trips).
        self._dead_letters = finished.dead_letters
        if finished.extended == 0:
            raise LockLost(
                f"{self.spec.name}:{self.shard}: the flush lock expired "
                "(a newer flusher may hold it)"
            )


def _batch(raw: list[Any]) -> Batch:
    """A stream reply's entries: every id and an Op per entry that has fields, built
    straight from the reply's lists."""
    ids: list[str] = []
    ops: list[Op] = []
    for sid, flat in raw:
        ids.append(sid)
        if flat:
            if isinstance(flat, dict):
                ops.append(Op.from_fields(sid, flat))
            else:
                ops.append(Op.from_flat(sid, flat))
    return Batch(ids, ops)


def _version(op: Op) -> str:
    return "" if op.version is None else str(op.version)


def _stream_order(bad: Rejected) -> tuple[int, int]:
    ms, _, seq = bad.op.id.partition("-")
    return int(ms), int(seq or 0)


def _keys_in_turn(ops: list[Op]) -> set[str]:
    """Keys with a partial write among two or more operations in the batch: coalescing
    would lose the columns the partial write leaves out, so they are applied in turn."""
    partial = {op.key for op in ops if op.partial}
    if not partial:
        return set()
    seen: set[str] = set()
    apart: set[str] = set()
    for op in ops:
        if op.key in partial:
            if op.key in seen:
                apart.add(op.key)
            seen.add(op.key)
    return apart


def _letter(bad: Rejected) -> tuple[str, str, str, str, str, str]:
    """A refused operation as finish.lua's letter: key, op, value, version, error, id."""
    op = bad.op
    return (op.key, op.stream_kind, op.value, _version(op), bad.error, op.id)


def flush_shard(context: Context, entity: str, shard: int, budget_ms: int = 5000) -> FlushResult:
    """Flush one shard of `entity` for up to `budget_ms` (the core of the flush task)."""
    spec = context.entity(entity)
    if not shardcount.holds(context, entity, shard):
        # No such shard at the count Redis records (a reshard to fewer shards drained
        # it): nothing to flush; let its queued marker and due entry go.
        write_scripts(context, entity).release(shard, "", 0)
        return FlushResult(entity, shard)
    started = time.monotonic()
    with structlog.contextvars.bound_contextvars(entity=entity, shard=shard):
        result = ShardFlusher(context, spec, shard).run(budget_ms)
    if result.status == "busy":
        metrics.emit("flush_lock_busy", entity=entity)
        return result
    metrics.emit("flush_seconds", time.monotonic() - started, entity=entity)
    if result.status in ("backoff", "fenced"):
        metrics.emit("flush_failures", entity=entity, status=result.status)
    if result.batches:
        metrics.emit("flush_rows", result.applied, entity=entity)
        stats = context.keys.flush_stats(entity)
        context.redis.hset(
            stats, mapping={"last_flush_ms": int(time.time() * 1000), "last_rows": result.applied}
        )
    return result
