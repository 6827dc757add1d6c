"""Flushing one shard of the write buffer into the database (the core, no Celery).

One flusher per shard, admitted by a Redis lock that carries a fencing token.
It reclaims whatever earlier flushers took and never acknowledged, then reads
new entries, coalesces each batch, applies it in one fenced transaction, sends
rejected rows to the dead-letter stream, and only then acknowledges.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.exceptions import RedisError, ResponseError

from cachewarden.backoff import backoff_ms
from cachewarden.coalesce import Op, coalesce
from cachewarden.deadletters import dead_letter
from cachewarden.errors import BackendUnavailable, ConfigError, LockLost
from cachewarden.fence import Fence, committed_token
from cachewarden.keys import STREAM_GROUP, due_member
from cachewarden.runtime import Runtime
from cachewarden.settings import EntitySettings
from cachewarden.sqlsink import Outcome, SqlSink

log = structlog.get_logger("cachewarden.writebehind")

Entries = list[tuple[str, dict[str, str] | None]]


@dataclass
class FlushResult:
    """What one flush did."""

    entity: str
    shard: int
    status: str = "done"  # done | busy | backoff | fenced
    entries: int = 0
    applied: int = 0
    rejected: int = 0
    batches: int = 0
    retry_in_ms: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class ShardFlusher:
    """Flushes one shard while holding its lock."""

    rt: Runtime
    spec: EntitySettings
    shard: int
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def _stream(self) -> str:
        return self.rt.keys.stream(self.spec.name, self.shard)

    def run(self, budget_ms: int) -> FlushResult:
        """Drain the shard for up to `budget_ms`, then release it."""
        result = FlushResult(self.spec.name, self.shard)
        token = self._acquire()
        if token == 0:
            result.status = "busy"
            return result
        hold_ms = 0
        try:
            fence = self._fence(token)
            sink = self.rt.sink(self.spec.name)
            self._drain(sink, fence, result, time.monotonic() + budget_ms / 1000)
            self.rt.redis.delete(self.rt.keys.retries(self.spec.name, self.shard))
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
        keys = self.rt.keys
        token: int = self.rt.scripts.lock_acquire(
            keys=[
                keys.flush_lock(self.spec.name, self.shard),
                keys.flush_fence(self.spec.name, self.shard),
            ],
            args=[self.owner, self.spec.write_behind.lock_ttl_ms],
        )
        if token:
            self._extend()
        return int(token)

    def _extend(self) -> None:
        keys = self.rt.keys
        ok = self.rt.scripts.lock_extend(
            keys=[
                keys.flush_lock(self.spec.name, self.shard),
                keys.queued(self.spec.name, self.shard),
            ],
            args=[self.owner, self.spec.write_behind.lock_ttl_ms],
        )
        if not ok:
            raise LockLost(
                f"{self.spec.name}:{self.shard}: the flush lock expired "
                "(a newer flusher may hold it)"
            )

    def _fence(self, token: int) -> Fence:
        """Our fence; if the database saw a higher token (Redis lost its counter), jump past it."""
        name = f"{self.rt.keys.prefix}:{self.spec.name}:{self.shard}"
        committed = committed_token(self.rt.engine, name)
        if committed >= token:
            counter = self.rt.keys.flush_fence(self.spec.name, self.shard)
            token = int(self.rt.redis.incrby(counter, committed - token + 1))
            # Only the lock's holder may jump: a flusher paused past its lock (the
            # higher token is its successor's) must not come back above it.
            self._extend()
        return Fence(name, token)

    def _backoff(self) -> int:
        wb = self.spec.write_behind
        attempt = int(self.rt.redis.incr(self.rt.keys.retries(self.spec.name, self.shard)))
        return backoff_ms(attempt, wb.retry_base_ms, wb.retry_max_ms)

    def _release(self, hold_ms: int) -> None:
        keys, name = self.rt.keys, self.spec.name
        self.rt.scripts.release(
            keys=[
                keys.flush_lock(name, self.shard),
                keys.queued(name, self.shard),
                self._stream,
                keys.due(),
            ],
            args=[
                self.owner,
                self.spec.write_behind.max_delay_ms,
                due_member(name, self.shard),
                hold_ms,
            ],
        )

    # -- reading and applying -----------------------------------------------------

    def _drain(self, sink: SqlSink, fence: Fence, result: FlushResult, deadline: float) -> None:
        for entries in self._batches():
            self._apply(entries, sink, fence, result)
            self._extend()
            if time.monotonic() >= deadline:
                break

    def _batches(self) -> Iterator[Entries]:
        """Entries others took and never acknowledged first, then new ones, in batches."""
        redis, size = self.rt.redis, self.spec.write_behind.batch_size
        _ensure_group(redis, self._stream)
        cursor = "0-0"
        while True:
            reply: list[Any] = redis.xautoclaim(
                self._stream, STREAM_GROUP, self.rt.consumer, 0, cursor, count=size
            )
            cursor, claimed = reply[0], reply[1]
            if claimed:
                yield claimed
            if cursor == "0-0":
                break
        while True:
            read: Any = redis.xreadgroup(
                STREAM_GROUP, self.rt.consumer, {self._stream: ">"}, count=size
            )
            if not read or not read[0][1]:
                return
            yield read[0][1]

    def _apply(self, entries: Entries, sink: SqlSink, fence: Fence, result: FlushResult) -> None:
        ops = [Op.from_fields(sid, fields) for sid, fields in entries if fields]
        winners = coalesce(ops)
        outcome = sink.apply(winners, fence) if winners else Outcome()
        rejected = outcome.rejected
        for bad in rejected:
            dead_letter(self.rt, self.spec, self.shard, bad)
        self._finish(entries, ops, winners, outcome)
        result.entries += len(entries)
        result.applied += len(winners) - len(rejected)
        result.rejected += len(rejected)
        result.batches += 1
        log.info(
            "flush_batch",
            batch_size=len(entries),
            applied=len(winners) - len(rejected),
            rejected=len(rejected),
            fence=fence.token,
        )

    def _finish(self, entries: Entries, ops: list[Op], winners: list[Op], outcome: Outcome) -> None:
        last_id = {op.key: op.id for op in ops}
        kind = {op.key: op.kind for op in winners}
        # "x": drop the entry. The database refused the row, or holds a newer version.
        kind.update({bad.op.key: "x" for bad in outcome.rejected})
        for op in outcome.stale:
            kind[op.key] = f"s:{op.version}:{self.spec.version_column}"
        triples = [part for key, sid in last_id.items() for part in (key, sid, kind[key])]
        ids = [sid for sid, _ in entries]
        self.rt.scripts.finish(
            keys=[self._stream, self.rt.keys.dirty(self.spec.name, self.shard)],
            args=[
                STREAM_GROUP,
                self.rt.keys.entry(self.spec.name, ""),
                self.spec.ttl_ms + self.spec.stale_ttl_ms,
                len(ids),
                *ids,
                *triples,
            ],
        )


def _ensure_group(redis: Any, stream: str) -> None:
    try:
        redis.xgroup_create(stream, STREAM_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def flush_shard(rt: Runtime, entity: str, shard: int, budget_ms: int = 5000) -> FlushResult:
    """Flush one shard of `entity` for up to `budget_ms` (the core of the flush task)."""
    spec = rt.entity(entity)
    with structlog.contextvars.bound_contextvars(entity=entity, shard=shard):
        return ShardFlusher(rt, spec, shard).run(budget_ms)
