"""Turning `write`, `delete` and their batch forms into buffered operations.

Validation happens here, before anything is sent: an unknown entity, a bad key,
an unencodable row or a value the entity's database is known to refuse (a NUL
character in a string, on PostgreSQL) is refused with an error naming it. The
operations then go to Redis in one call of enqueue.lua, which reports per
operation whether its shard took it (`Backpressure` when the shard is full).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from cachewarden.codec import ABSENT, Key, encode_row, key_text
from cachewarden.connections import REDIS_DOWN
from cachewarden.context import Context
from cachewarden.errors import (
    BackendUnavailable,
    Backpressure,
    CachewardenError,
    InvalidValue,
    Outranked,
)
from cachewarden.scripts import ReplyLost
from cachewarden.scripts.writebehind import (
    BACKPRESSURE,
    DEAD_LETTERS,
    MEMORY,
    SHARDS,
    TOMBSTONE,
    Pending,
    WriteScripts,
)
from cachewarden.settings import EntitySettings
from cachewarden.writebehind import shardcount
from cachewarden.writebehind.coalesce import PARTIAL
from cachewarden.writebehind.memory import full_redis, memory_refusal
from cachewarden.writebehind.shardcount import shards_refusal

# What enqueue answers per operation: its stream id (taken), or why it was not taken.
Outcome = str | Backpressure | Outranked


@dataclass
class BatchResult:
    """What `write_many` or `delete_many` did, per key: the stream id of each operation
    taken, the error of each one refused (nothing of a refused one was sent), and the
    keys whose versioned operation a newer delete's tombstone outranked (not taken;
    `write` and `delete` raise Outranked for one).

    A key given more than once keeps its last outcome of each kind, so it can be
    in both: one of its writes taken, a later one refused.
    """

    taken: dict[str, str] = field(default_factory=dict)
    refused: dict[str, CachewardenError] = field(default_factory=dict)
    outranked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every operation was taken."""
        return not self.refused


class RecordedScripts(WriteScripts):
    """WriteScripts for the shard count Redis records (built by `write_scripts`): they
    know their context, so a call that meets a count moved since can follow it."""

    def __init__(self, context: Context, spec: EntitySettings, shards: int) -> None:
        if spec.write_behind.shards != shards:
            spec = replace(spec, write_behind=replace(spec.write_behind, shards=shards))
        super().__init__(context.lua, context.keys, spec, context.settings.redis.memory_headroom)
        self.context = context

    def follow(self, record: str) -> bool:
        """Take `record` as the entity's count, as enqueue.lua answered it ("!SHARDS
        <record>": nothing of the call was taken). True when the call may be sent again
        on it; False while a reshard drains ("N>M": writes wait)."""
        shardcount.learn(self.context, self.spec.name, record)
        return ">" not in record


def write_scripts(context: Context, entity: str) -> WriteScripts:
    """The context's write-path scripts of `entity`, for the shard count Redis records
    (not the config's: see shardcount.py) as this process last saw it: enqueue.lua
    checks it on every call, and its answer that the count moved is followed at once
    (`_send`); flushers refresh it (`shardcount.holds`). While a reshard N>M drains
    they are for N: the flushers drain N, and writes are refused."""
    spec = context.entity(entity)
    shards = shardcount.known(context, spec.name)
    return context.shared(
        f"write_scripts:{shards}", spec.name, lambda: RecordedScripts(context, spec, shards)
    )


def write_op(
    spec: EntitySettings,
    key: Key,
    row: Mapping[str, Any],
    text: str | None = None,
    columns: frozenset[str] | None = None,
) -> Pending:
    """The buffered form of a write; raises InvalidKey or InvalidValue naming the problem.

    `text` is the key's validated text where the caller has it (Context.key_text);
    `columns` the table's columns where it is reflected (Context.columns): a row that
    lacks some of them is a partial write ("p"), which enqueue.lua merges into the
    cached row and the flusher merges with the key's earlier writes of a batch."""
    text = key_text(spec.name, key, len(spec.key_columns)) if text is None else text
    row = _with_key(spec, text, key, row)
    version = _version_of(spec, text, row)
    op = "w" if columns is None or columns <= row.keys() else PARTIAL
    return Pending(op, text, encode_row(spec.name, text, row, spec.max_value_bytes), version)


def delete_op(
    spec: EntitySettings, key: Key, version: int | None, text: str | None = None
) -> Pending:
    """The buffered form of a delete; raises InvalidKey or InvalidValue naming the problem."""
    text = key_text(spec.name, key, len(spec.key_columns)) if text is None else text
    if version is not None and spec.version_column is None:
        raise InvalidValue(f"{spec.name}:{text}: a version was given but no version_column is set")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise InvalidValue(f"{spec.name}:{text}: the version must be an int, got {version!r}")
    return Pending("d", text, ABSENT, "" if version is None else str(version))


def enqueue(scripts: WriteScripts, ops: Sequence[Pending]) -> list[Outcome]:
    """Send `ops` in one round trip: per op, its stream id, the Backpressure refusing it,
    or Outranked when a versioned delete's tombstone outranks it (nothing was buffered).

    Raises InvalidValue, sending nothing, for a write the entity's database is known to
    refuse (`refusal`), and BackendUnavailable when Redis cannot be reached or refuses
    the call.
    """
    for op in ops:
        refused = refusal(scripts, op)
        if refused is not None:
            raise refused
    return _send(scripts, ops)


def _send(scripts: WriteScripts, ops: Sequence[Pending], follow: bool = True) -> list[Outcome]:
    """enqueue's round trip. A call enqueue.lua refused whole for the shard count
    ("!SHARDS <record>", nothing taken) is sent once more on the count Redis records
    (`follow`), or raises Backpressure while a reshard drains."""
    try:
        replies: list[str] = scripts.enqueue(ops)
    except RedisError as exc:
        raise send_failed(scripts, exc) from None
    again = follow_shards(scripts, replies, follow)
    if again is not None:
        return _send(again, ops, follow=False)
    return outcomes(scripts, ops, replies)


def send_failed(scripts: WriteScripts, exc: RedisError) -> CachewardenError:
    """The error of an enqueue.lua call Redis refused or never answered (the asyncio
    cache's sends too): Backpressure when Redis is full, else BackendUnavailable saying
    whether the write may be buffered (the reply was lost after it went out) or not."""
    spec = scripts.spec
    if isinstance(exc, ResponseError):
        if isinstance(exc, OutOfMemoryError) or "maxmemory" in str(exc):
            return full_redis(spec.name, _redis_address(scripts), str(exc))
        return BackendUnavailable(f"{spec.name}: Redis refused the write: {exc}")
    if isinstance(exc, ReplyLost):
        return BackendUnavailable(
            f"{spec.name}: the connection to Redis at {_redis_address(scripts)} broke after "
            f"the write went out ({exc}), so it may or may not be buffered; writing it again "
            "is safe (the upsert is idempotent: with a version column the retry changes "
            "nothing, without one the last write still wins)"
        )
    if isinstance(exc, REDIS_DOWN):
        return BackendUnavailable(
            f"{spec.name}: Redis at {_redis_address(scripts)} is unreachable ({exc}); "
            "the write was not taken"
        )
    return BackendUnavailable(f"{spec.name}: Redis error: {exc}")


def follow_shards(
    scripts: WriteScripts, replies: Sequence[str], follow: bool
) -> WriteScripts | None:
    """None when enqueue.lua took the call; when it refused it whole for the shard count
    ("!SHARDS <record>"), the scripts of the count Redis records to send it again on
    (`follow`: once), or Backpressure raised while a reshard drains."""
    if not replies or not replies[0].startswith(SHARDS):
        return None
    record = replies[0].split()[1]
    if follow and isinstance(scripts, RecordedScripts) and scripts.follow(record):
        return write_scripts(scripts.context, scripts.spec.name)
    raise shards_refusal(scripts.spec, record)


def outcomes(
    scripts: WriteScripts, ops: Sequence[Pending], replies: Sequence[str]
) -> list[Outcome]:
    """Per op, what enqueue.lua answered: its stream id, Backpressure or Outranked."""
    return [_outcome(scripts, op, reply) for op, reply in zip(ops, replies, strict=True)]


def _outcome(scripts: WriteScripts, op: Pending, reply: str) -> Outcome:
    if not reply.startswith("!"):
        return reply  # a stream id: taken
    if reply.startswith(BACKPRESSURE):
        return _backpressure(scripts, op.key)
    if reply.startswith(MEMORY):
        mark = reply.removeprefix(MEMORY)
        return memory_refusal(scripts.spec.name, _redis_address(scripts), mark)
    if reply.startswith(DEAD_LETTERS):
        spec = scripts.spec
        return Backpressure(
            f"{spec.name}: {reply.split()[1]} dead letters are waiting (the bound is "
            f"write_behind.max_dead_letters = {spec.write_behind.max_dead_letters}); the "
            f"write of {op.key!r} was not taken. Replay or discard them first: "
            f"cachewarden dead-letters list {spec.name}"
        )
    if reply.startswith(TOMBSTONE):
        op_name = "delete" if op.op == "d" else "write"
        newer = reply.removeprefix(TOMBSTONE).strip()
        return Outranked(scripts.spec.name, op.key, op_name, op.version, newer)
    return reply


def enqueue_many(scripts: WriteScripts, ops: Sequence[Pending], result: BatchResult) -> None:
    """Send a batch's valid ops in one round trip; record each key's outcome in `result`
    (a write the entity's database is known to refuse is refused here, not sent)."""
    ops = sendable(scripts, ops, result)
    if ops:
        record(result, ops, _send(scripts, ops))


def sendable(scripts: WriteScripts, ops: Sequence[Pending], result: BatchResult) -> list[Pending]:
    """The ops of a batch to send: a write the entity's database is known to refuse is
    recorded in `result.refused` instead."""
    if not _refuses_nul(scripts):
        return list(ops)
    valid = []
    for op in ops:
        problem = refusal(scripts, op)
        if problem is None:
            valid.append(op)
        else:
            result.refused[op.key] = problem
    return valid


def record(result: BatchResult, ops: Sequence[Pending], outcomes: Sequence[Outcome]) -> None:
    """Record each sent op's outcome in `result`: taken, refused or outranked."""
    for op, outcome in zip(ops, outcomes, strict=True):
        if isinstance(outcome, Backpressure):
            result.refused[op.key] = outcome
        elif isinstance(outcome, Outranked):
            result.outranked.append(op.key)
        else:
            result.taken[op.key] = outcome


def _redis_address(scripts: WriteScripts) -> str:
    """host:port of the Redis the scripts talk to, for error messages (never the password)."""
    kwargs = scripts.lua.client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


def _backpressure(scripts: WriteScripts, key: str) -> Backpressure:
    spec = scripts.spec
    wb = spec.write_behind
    return Backpressure(
        f"{spec.name}: shard {scripts.shard(key)} holds {wb.max_pending} unflushed writes "
        f"(write_behind.max_pending); the write of {key!r} was not taken. "
        "Retry later; if this persists, check the flushers and the database."
    )


def refusal(scripts: WriteScripts, op: Pending) -> InvalidValue | None:
    """Why the entity's database will refuse the write `op` however it is flushed, or None:
    on PostgreSQL, a column's string holding a NUL character ('\\x00'). Cheap: JSON
    writes a NUL as the escape \\u0000, so only a row whose text holds that escape is
    decoded to be sure. (A NUL nested in a JSON value is left to the database: json
    keeps it, jsonb refuses it and the row is dead-lettered.)"""
    if not _refuses_nul(scripts) or _NUL_ESCAPE not in op.value or op.op == "d":
        return None
    row = json.loads(op.value)
    for column, value in row.items() if isinstance(row, dict) else ():
        if isinstance(value, str) and "\x00" in value:
            return InvalidValue(
                f"{scripts.spec.name}:{op.key}: column {column!r} holds a NUL character "
                "('\\x00'), which PostgreSQL cannot store in text; remove it first "
                "(value.replace('\\x00', '')), or keep binary data in a bytea column and "
                "write it as bytes"
            )
    return None


_NUL_ESCAPE = "\\u0000"  # a NUL character as JSON (codec.encode_row) writes it


def _refuses_nul(scripts: WriteScripts) -> bool:
    """True when the entity's database is PostgreSQL, which stores no NUL in text (and
    whose driver will not send one). Known for scripts built by `write_scripts`."""
    if not isinstance(scripts, RecordedScripts):
        return False
    context = scripts.context
    return context.shared("refuses_nul", "", lambda: _is_postgresql(context.settings.database.url))


def _is_postgresql(url: str) -> bool:
    try:
        return make_url(url).get_backend_name() == "postgresql"
    except ArgumentError:
        return False


def _with_key(
    spec: EntitySettings, text: str, key: Key, row: Mapping[str, Any]
) -> Mapping[str, Any]:
    """The row with its key column(s) set from `key`; InvalidValue where the row holds
    another key."""
    if type(row) is not dict and not isinstance(row, Mapping):
        raise InvalidValue(
            f"{spec.name}:{text}: the row is a {type(row).__name__}; pass a dict of column values"
        )
    names = spec.key_columns
    if len(names) == 1:
        name = names[0]
        if name not in row:
            return {**row, name: key}
        if str(row[name]) != text:
            raise InvalidValue(
                f"{spec.name}:{text}: row[{name!r}] is {row[name]!r}, not the key {text!r}"
            )
        return row
    # Composite: key_text took `key` as a tuple of len(names) values.
    parts = cast("tuple[str | int, ...]", key)
    missing = {}
    for name, part in zip(names, parts, strict=True):
        if name not in row:
            missing[name] = part
        elif str(row[name]) != str(part):
            raise InvalidValue(
                f"{spec.name}:{text}: row[{name!r}] is {row[name]!r}, not {part!r} of the "
                f"key ({spec.key_label})"
            )
    return {**row, **missing} if missing else row


def _version_of(spec: EntitySettings, text: str, row: Mapping[str, Any]) -> str:
    if spec.version_column is None:
        return ""
    version = row.get(spec.version_column)
    if type(version) is not int:  # (a bool is not a version)
        raise InvalidValue(
            f"{spec.name}:{text}: row[{spec.version_column!r}] must be an int version "
            f"(entities.{spec.name}.version_column), got {version!r}"
        )
    return str(version)
