"""Coalescing a batch of buffered writes: one operation per key survives.

Pure code: no Redis, no SQL. The rule: the last operation in stream order
wins, except that where operations carry versions, one with a lower version
than the current winner never replaces it. A survivor that follows an
unversioned delete of its key is marked `replaces`: the sink clears the row
first, so the survivor is not judged against a version the delete removed.
A partial write (some of the row's columns, "p" in the stream) is not coalesced
with the other operations of its key: the flusher applies that key's operations one
after another (see flush.py), as the database would have taken them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

WRITE = "w"
DELETE = "d"
PARTIAL = "p"  # in the stream: a write of some of the row's columns (Op.partial)


@dataclass(slots=True)
class Op:
    """One buffered operation as read from a write stream (not frozen: a frozen
    dataclass's __init__ costs four times as much, and a flush builds one per entry;
    nothing changes an Op once built, `dataclasses.replace` makes a new one)."""

    id: str
    kind: str
    key: str
    value: str
    version: int | None = None
    # True when an unversioned delete of the key came earlier in the same batch: the
    # stored row is gone whatever its version, so the survivor applies unguarded.
    replaces: bool = False
    # A write of some of the row's columns ("p" in the stream; its kind is WRITE).
    partial: bool = False

    @classmethod
    def from_fields(cls, stream_id: str, fields: Mapping[str, str]) -> Op:
        """Build an Op from a stream entry's fields (o, k, v and optional n)."""
        version = fields.get("n")
        kind = fields.get("o", "")
        return cls(
            id=stream_id,
            kind=WRITE if kind == PARTIAL else kind,
            key=fields.get("k", ""),
            value=fields.get("v", ""),
            version=int(version) if version else None,
            partial=kind == PARTIAL,
        )

    @classmethod
    def from_flat(cls, stream_id: str, flat: Sequence[str]) -> Op:
        """Build an Op from a stream entry's fields as the server sends them, a flat list
        of names and values (enqueue.lua writes o, k, v and optional n in that order)."""
        if len(flat) in (6, 8) and flat[0] == "o" and flat[2] == "k" and flat[4] == "v":
            kind = flat[1]
            if kind == PARTIAL:
                return cls.from_fields(stream_id, dict(zip(flat[::2], flat[1::2], strict=True)))
            if len(flat) == 6:
                return cls(stream_id, kind, flat[3], flat[5])
            if flat[6] == "n":
                version = flat[7]
                return cls(stream_id, kind, flat[3], flat[5], int(version) if version else None)
        return cls.from_fields(stream_id, dict(zip(flat[::2], flat[1::2], strict=True)))

    @property
    def stream_kind(self) -> str:
        """The op as the stream (and a dead letter) spells it: "w", "p" or "d"."""
        return PARTIAL if self.partial else self.kind


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
