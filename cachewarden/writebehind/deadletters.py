"""The dead-letter stream: rows the database refused, kept with the error.

The flusher moves a refused row here in the same script that settles its
batch (finish.lua): no crash can leave a letter half made or its batch settled
without it. The dead-letter keys hash names each key's newest letter while no
newer write of the key came.

Nothing is dropped: a rejected row waits here until it is replayed (after the
data or the table is fixed) or discarded by an operator. A newer write of the
same key supersedes its dead letter, so a replay never overwrites newer data
(unless forced). A replay is checked as a write is (replay.lua makes every check
enqueue.lua makes, on the shard count Redis records), and a discard reads and
deletes in one script.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from redis import Redis
from redis.exceptions import OutOfMemoryError, ResponseError

from cachewarden.errors import Backpressure, CachewardenError, Outranked
from cachewarden.keys import Keyspace
from cachewarden.scripts import Registry
from cachewarden.scripts.writebehind import SHARDS, Pending, WriteScripts, discard_letter
from cachewarden.settings import EntitySettings, RedisSettings
from cachewarden.writebehind.enqueue import _outcome, _redis_address
from cachewarden.writebehind.memory import full_redis
from cachewarden.writebehind.shardcount import count_of, recorded, shards_refusal

GONE = "!GONE"


@dataclass(frozen=True)
class DeadLetter:
    """One rejected operation."""

    id: str
    entity: str
    op: str
    key: str
    value: str
    version: str
    error: str
    stream_id: str
    failed_at_ms: int

    @classmethod
    def from_entry(cls, entity: str, dead_id: str, fields: dict[str, str]) -> DeadLetter:
        """Parse one entry of the dead-letter stream."""
        return cls(
            id=dead_id,
            entity=entity,
            op=fields.get("o", ""),
            key=fields.get("k", ""),
            value=fields.get("v", ""),
            version=fields.get("n", ""),
            error=fields.get("error", ""),
            stream_id=fields.get("stream_id", ""),
            failed_at_ms=int(fields.get("failed_at_ms", "0")),
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return self.__dict__.copy()


def list_dead(redis: Redis, keys: Keyspace, entity: str, count: int = 100) -> list[DeadLetter]:
    """The oldest `count` dead letters of an entity."""
    entries: Any = redis.xrange(keys.dead(entity), count=count)
    return [DeadLetter.from_entry(entity, i, f) for i, f in entries]


def count_dead(redis: Redis, keys: Keyspace, entity: str) -> int:
    """How many dead letters an entity holds."""
    return int(redis.xlen(keys.dead(entity)))


def replay(
    redis: Redis,
    keys: Keyspace,
    spec: EntitySettings,
    letter: DeadLetter,
    force: bool = False,
    memory_headroom: float = RedisSettings.memory_headroom,
) -> str:
    """Re-enqueue a dead letter, checked as a write is: return its new stream id, or
    "superseded" (the letter dropped) when a newer write of its key came after it (unless
    `force`) or a newer delete outranks it. It goes to the shard of the count Redis
    records. Raises what a write raises when it is not taken (Backpressure: the shard is
    full, the entity holds max_dead_letters besides it, Redis is short of memory, a
    reshard drains), and CachewardenError when the letter is no longer held."""
    lua = Registry(redis)
    pending = Pending(letter.op, letter.key, letter.value, letter.version)
    record = recorded(redis, keys, spec.name)
    for _ in range(2):  # once more when the count moved between the read and the script
        count = spec.write_behind.shards if record is None else count_of(record)
        scripts = WriteScripts(lua, keys, _with_shards(spec, count), memory_headroom)
        reply = _replayed(scripts, letter, pending, force)
        if not reply.startswith(SHARDS):
            break
        record = reply.split()[1]
        if ">" in record:
            break
    if reply.startswith(SHARDS):
        raise shards_refusal(spec, reply.split()[1])
    if reply == GONE:
        raise CachewardenError(
            f"{spec.name}: dead letter {letter.id} (key {letter.key!r}) is no longer held: "
            "it was replayed or discarded already"
        )
    outcome = _outcome(scripts, pending, reply) if reply.startswith("!") else reply
    if isinstance(outcome, Backpressure):
        raise outcome
    return "superseded" if isinstance(outcome, Outranked) else outcome


def _replayed(scripts: WriteScripts, letter: DeadLetter, pending: Pending, force: bool) -> str:
    try:
        return scripts.replay(letter.id, pending, force)
    except ResponseError as exc:
        if isinstance(exc, OutOfMemoryError) or "maxmemory" in str(exc):
            raise full_redis(scripts.spec.name, _redis_address(scripts), str(exc)) from None
        raise


def _with_shards(spec: EntitySettings, shards: int) -> EntitySettings:
    if spec.write_behind.shards == shards:
        return spec
    return replace(spec, write_behind=replace(spec.write_behind, shards=shards))


def discard(redis: Redis, keys: Keyspace, entity: str, dead_id: str) -> bool:
    """Delete one dead letter for good (and forget it as its key's newest, where it still
    is), in one script: a newer letter of its key stays replayable. False when the letter
    was not held."""
    return discard_letter(Registry(redis), keys, entity, dead_id)
