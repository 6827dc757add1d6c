"""The dead-letter stream: rows the database refused, kept with the error.

The flusher moves a refused row here in the same script that acknowledges its
batch (finish.lua), and only while it is still its key's newest pending
operation: no crash can leave a letter half made or its batch acknowledged
without it.

Nothing is dropped: a rejected row waits here until it is replayed (after the
data or the table is fixed) or discarded by an operator. A newer write of the
same key supersedes its dead letter, so a replay never overwrites newer data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.exceptions import ResponseError

from cachewarden.errors import Backpressure
from cachewarden.keys import Keyspace
from cachewarden.scripts import Registry
from cachewarden.scripts.writebehind import Pending, WriteScripts
from cachewarden.settings import EntitySettings

if TYPE_CHECKING:
    pass


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
    redis: Redis, keys: Keyspace, spec: EntitySettings, letter: DeadLetter, force: bool = False
) -> str:
    """Re-enqueue a dead letter; return the new stream id, or "superseded"."""
    scripts = WriteScripts(Registry(redis), keys, spec)
    try:
        return scripts.replay(
            letter.id, Pending(letter.op, letter.key, letter.value, letter.version), force
        )
    except ResponseError as exc:
        if "BACKPRESSURE" in str(exc):
            shard = scripts.shard(letter.key)
            raise Backpressure(f"{spec.name}: shard {shard} is full; replay later") from None
        raise


def discard(redis: Redis, keys: Keyspace, entity: str, dead_id: str) -> bool:
    """Delete one dead letter for good (and forget it as its key's newest)."""
    letters: Any = redis.xrange(keys.dead(entity), dead_id, dead_id)
    for _, fields in letters:
        key = fields.get("k", "")
        if redis.hget(keys.dead_keys(entity), key) == dead_id:
            redis.hdel(keys.dead_keys(entity), key)
    return bool(redis.xdel(keys.dead(entity), dead_id))
