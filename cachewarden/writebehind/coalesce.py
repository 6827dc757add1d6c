"""Coalescing a batch of buffered writes: one operation per key survives.

Pure code: no Redis, no SQL. The rule: the last operation in stream order
wins, except that where operations carry versions, one with a lower version
than the current winner never replaces it. A survivor that follows an
unversioned delete of its key is marked `replaces`: the sink clears the row
first, so the survivor is not judged against a version the delete removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

WRITE = "w"
DELETE = "d"


@dataclass(frozen=True, slots=True)
class Op:
    """One buffered operation as read from a write stream."""

    id: str
    kind: str
    key: str
    value: str
    version: int | None = None
    # True when an unversioned delete of the key came earlier in the same batch: the
    # stored row is gone whatever its version, so the survivor applies unguarded.
    replaces: bool = False

    @classmethod
    def from_fields(cls, stream_id: str, fields: Mapping[str, str]) -> Op:
        """Build an Op from a stream entry's fields (o, k, v and optional n)."""
        version = fields.get("n")
        return cls(
            id=stream_id,
            kind=fields.get("o", ""),
            key=fields.get("k", ""),
            value=fields.get("v", ""),
            version=int(version) if version else None,
        )


def supersedes(new: Op, current: Op) -> bool:
    """True when `new` (later in stream order) replaces `current` for the same key."""
    if new.version is None or current.version is None:
        return True
    return new.version >= current.version


def coalesce(ops: Iterable[Op]) -> list[Op]:
    """The surviving operation of each key, in the stream order of their last arrival."""
    winners: dict[str, Op] = {}
    for op in ops:
        current = winners.get(op.key)
        if current is None or supersedes(op, current):
            if current is not None and (
                current.replaces or (current.kind == DELETE and current.version is None)
            ):
                op = replace(op, replaces=True)
            winners.pop(op.key, None)
            winners[op.key] = op
    return list(winners.values())
