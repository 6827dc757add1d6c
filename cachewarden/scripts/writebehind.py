"""The write path's scripts, one typed method per `.lua` file.

`enqueue` is the application's one round trip; the others are the flusher's
lock, fence and acknowledgement steps, the dispatcher's due-shard query and
the dead-letter replay.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from cachewarden.keys import Keyspace, due_member, shard_of
from cachewarden.scripts import InFlight, Registry, ScriptCall
from cachewarden.settings import EntitySettings, RedisSettings

BACKPRESSURE = "!BACKPRESSURE"
TOMBSTONE = "!TOMBSTONE"
DEAD_LETTERS = "!DEADLETTERS"
SHARDS = "!SHARDS"
MEMORY = "!MEMORY"


class Pending(NamedTuple):
    """One operation to buffer: op ("w" write, "p" write of some columns, "d" delete), key,
    JSON value, version."""

    op: str
    key: str
    value: str
    version: str  # "" for none


class Finished(NamedTuple):
    """What finish.lua did: keys settled, dead letters added, whether the lock was
    extended (1, 0: its owner lost it, -1: not asked) and dead letters now held."""

    settled: int
    dead: int
    extended: int
    dead_letters: int


class Finishing:
    """A finish.lua call sent and not yet read: the flusher applies its next batch to
    the database meanwhile, and reads this before it sends the next finish."""

    def __init__(self, call: InFlight) -> None:
        self._call = call

    def result(self) -> Finished:
        done, dead, extended, held = self._call.reply()
        return Finished(int(done), int(dead), int(extended), int(held))


class WriteScripts:
    """The write path's scripts for one entity."""

    def __init__(
        self,
        lua: Registry,
        keys: Keyspace,
        spec: EntitySettings,
        memory_headroom: float = RedisSettings.memory_headroom,
    ) -> None:
        self.lua = lua
        self.keys = keys
        self.spec = spec
        name = spec.name
        shards = spec.write_behind.shards
        self._entry = keys.entry_prefix(name)
        self._lease = keys.lease_prefix(name)
        self._tomb = keys.tombstone_prefix(name)
        self._streams = [keys.stream(name, n) for n in range(shards)]
        self._dirty = [keys.dirty(name, n) for n in range(shards)]
        self._members = [due_member(name, n) for n in range(shards)]
        self._per_shard = list(zip(self._streams, self._dirty, self._members, strict=True))
        self._head = [
            keys.due(),
            keys.dead_keys(name),
            keys.dead(name),
            keys.shard_count(name),
            keys.memory_mark(),
            keys.tombstones(name),
        ]
        wb = spec.write_behind
        self._limits: list[Any] = [
            wb.max_pending,
            wb.batch_size,
            wb.max_delay_ms,
            spec.version_column or "",
            spec.tombstone_ttl_ms,
            wb.max_dead_letters,
            shards,
            memory_headroom,
        ]

    def shard(self, key: str) -> int:
        """The shard a key's operations go to."""
        return shard_of(key, len(self._streams))

    # -- enqueue.lua ------------------------------------------------------------

    def enqueue(self, ops: Sequence[Pending]) -> Any:
        """Buffer `ops` in one script call: per op, its stream id, "!BACKPRESSURE n",
        "!DEADLETTERS n" (the entity holds max_dead_letters: nothing was taken),
        "!SHARDS record" (the recorded shard count is not ours, or a reshard runs),
        "!MEMORY used maxmemory" (Redis is within the write headroom: not taken) or
        "!TOMBSTONE v" (a delete at version v outranks it: it was ignored). Never sent
        again once it went out (an XADD resent is a second write)."""
        return self.lua.call(*self.enqueue_call(ops), resend=False)

    def enqueue_call(self, ops: Sequence[Pending]) -> ScriptCall:
        """enqueue.lua's call (`enqueue` sends it; so does the asyncio cache)."""
        keys = list(self._head)
        args = list(self._limits)
        entry, lease, tomb, shards = self._entry, self._lease, self._tomb, self._per_shard
        count = len(shards)
        for op, key, value, version in ops:
            stream, dirty, member = shards[shard_of(key, count)]
            keys += (entry + key, stream, dirty, lease + key, tomb + key)
            args += (op, key, value, version, member)
        return ScriptCall("enqueue", keys, args)

    # -- lock_acquire.lua, lock_extend.lua, release.lua: the flusher's lock --------

    def lock_acquire(self, shard: int, owner: str) -> int:
        """Take the shard's lock for `owner`: its fencing token, or 0 when another holds it."""
        keys, name = self.keys, self.spec.name
        token = self.lua.run(
            "lock_acquire",
            keys=[keys.flush_lock(name, shard), keys.flush_fence(name, shard)],
            args=[owner, self.spec.write_behind.lock_ttl_ms],
        )
        return int(token)

    def lock_extend(self, shard: int, owner: str) -> bool:
        """Extend the lock and the shard's queued marker if `owner` still holds the lock."""
        keys, name = self.keys, self.spec.name
        ok = self.lua.run(
            "lock_extend",
            keys=[keys.flush_lock(name, shard), keys.queued(name, shard)],
            args=[owner, self.spec.write_behind.lock_ttl_ms],
        )
        return bool(ok)

    def release(self, shard: int, owner: str, hold_ms: int) -> None:
        """Release the lock, hold or clear the queued marker, reschedule from the oldest entry."""
        keys, name = self.keys, self.spec.name
        self.lua.run(
            "release",
            keys=[
                keys.flush_lock(name, shard),
                keys.queued(name, shard),
                keys.stream(name, shard),
                keys.due(),
            ],
            args=[owner, self.spec.write_behind.max_delay_ms, due_member(name, shard), hold_ms],
        )

    # -- finish.lua -------------------------------------------------------------

    def finish(
        self,
        shard: int,
        ids: Sequence[str],
        written: Mapping[str, str],
        others: Sequence[tuple[str, str, str]] = (),
        letters: Sequence[tuple[str, str, str, str, str, str]] = (),
        owner: str = "",
        kept: str = "",
        values: Sequence[str] = (),
    ) -> Finishing:
        """Delete the batch's entries `ids` (in stream order) from the stream; settle each
        written key (`written`: key -> the id of its newest entry in the batch) and each
        (key, id, op) of `others` whose id is still its newest; dead-letter each of
        `letters` (key, op, value, version, error, stream id); all only while `owner`
        holds the shard's lock (extended). `kept`: the oldest entry this flush leaves in
        the stream ("" for none). The script is sent now; `.result()` of what this
        returns reads what it did.

        op: "d" deleted, "x" refused (drop the entry), "v" a write applied in place of
        a refused one (its value, in order, in `values`), "s:<version>:<column>"
        outranked by a newer version in the database.
        """
        name, entry = self.spec.name, self._entry
        # Without a kept entry one trim below the last id deletes the batch: no ids.
        extras = list(ids) if kept else []
        keys = [
            self._streams[shard],
            self._dirty[shard],
            self.keys.dead(name),
            self.keys.dead_keys(name),
            self.keys.warming(name),
            self.keys.touched(name),
            self.keys.flush_lock(name, shard),
            self.keys.queued(name, shard),
        ]
        keys += [entry + key for key in written]
        keys += [entry + key for key, _, _ in others]
        args: list[Any] = [
            kept,
            self.spec.ttl_ms + self.spec.stale_ttl_ms,
            shard,
            int(time.time() * 1000),
            ids[-1] if ids else "",
            owner,
            self.spec.write_behind.lock_ttl_ms,
            len(extras),
            len(written),
            len(others),
            len(letters),
            *extras,
            *written.values(),
        ]
        # Regions the script hands to XDEL and HMGET as they are: ids, then keys.
        args += [sid for _, sid, _ in others]
        args += written
        args += [key for key, _, _ in others]
        args += [op for _, _, op in others]
        args += values
        for letter in letters:
            args += letter
        return Finishing(self.lua.send_script("finish", keys, args))

    # -- replay.lua -------------------------------------------------------------

    def replay(self, letter_id: str, pending: Pending, force: bool) -> str:
        """Re-enqueue a dead letter, with every check `enqueue` makes, unless a newer write
        superseded it: its new stream id; "superseded" (the letter dropped) when a newer
        write came (unless `force`) or a newer delete's tombstone outranks it; "!GONE"
        when the letter is no longer held; or, nothing changed, one of enqueue's refusals:
        "!MEMORY used max", "!SHARDS record", "!DEADLETTERS n", "!BACKPRESSURE n".
        Safe to send again: a second run finds its letter gone."""
        key = pending.key
        stream, dirty, member = self._per_shard[self.shard(key)]
        keys = [*self._head, self._entry + key, stream, dirty, self._lease + key, self._tomb + key]
        args = [*self._limits, pending.op, key, pending.value, pending.version, member]
        args += [letter_id, "1" if force else "0"]
        result: str = self.lua.run("replay", keys=keys, args=args)
        return result


# -- discard.lua (one entity's dead letters) -----------------------------------------


def discard_letter(lua: Registry, keys: Keyspace, entity: str, dead_id: str) -> bool:
    """Delete one dead letter, and forget it as its key's newest where it still is, in one
    script (a newer letter of the key made meanwhile stays replayable). False when the
    letter was not held."""
    names = [keys.dead(entity), keys.dead_keys(entity)]
    return bool(lua.run("discard", keys=names, args=[dead_id]))


# -- dispatch.lua (all entities) ---------------------------------------------------


def claim_shards(lua: Registry, markers: list[str], ttl_ms: int) -> list[bool]:
    """Set each shard's queued marker unless set (at maxmemory too): True where claimed."""
    return [bool(n) for n in lua.run("claim", keys=markers, args=[ttl_ms])] if markers else []


def due_shards(lua: Registry, keys: Keyspace, most: int) -> list[str]:
    """The due-set members ("entity:shard") whose flush deadline has passed."""
    return [str(m) for m in lua.run("dispatch", keys=[keys.due()], args=[most])]
