"""The warming scripts, one typed method per `.lua` file: slots, runs, chunks, fills.

A job's due time (slot) is claimed once across every scheduler (`slot_claim`).
A run takes the job's run lock and the next run number (`warm_start`), which
fences off any older run: each chunk checks it when it begins (`warm_begin`) and
again when it fills (`warm_fill`), so a run that paused past a newer one's start
writes nothing. `warm_keep` extends the lock while a process works on the run;
`warm_end` records the plan, fails the run, or finishes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cachewarden.keys import Keyspace, shard_of
from cachewarden.scripts import Registry

# warm_fill: how often a fill follows a shard count that moved before it reads again.
FILL_TRIES = 3


class WarmScripts:
    """The scripts of one warming job, on its entity's keys."""

    def __init__(self, lua: Registry, keys: Keyspace, job: str, entity: str, shards: int) -> None:
        self.lua = lua
        self.job = job
        self._record = keys.job(job)
        self._run = keys.run(job)
        self._last = keys.last_run(job)
        self._chunks = keys.run_chunks(job)
        self._history = keys.run_history(job)
        self._lock = keys.run_lock(job)
        self._fence = keys.run_fence(job)
        self._marker = keys.warming(entity)
        self._touched = keys.touched(entity)
        self._dirty = [keys.dirty(entity, n) for n in range(shards)]
        self._entry = keys.entry_prefix(entity)
        # warm_fill checks `shards` against the count Redis records, and follows it.
        self._keys, self._entity = keys, entity
        self._shards_record = keys.shard_count(entity)

    # -- slot_claim.lua -----------------------------------------------------------

    def slot_claim(self, slot_ms: int, clock_ms: int, scheduler: str, missed: bool) -> bool:
        """Claim the job's due time `slot_ms` (or record it missed): False when it, or a
        later one, was claimed already."""
        args = [slot_ms, clock_ms, scheduler, "missed" if missed else "fire"]
        return bool(self.lua.run("slot_claim", keys=[self._record], args=args))

    # -- slot_release.lua ---------------------------------------------------------

    def slot_release(self, slot_ms: int, scheduler: str, error: str) -> bool:
        """Give back due time `slot_ms`, claimed by `scheduler`, whose run could not be
        sent: False when a later claim holds the record now."""
        args = [slot_ms, scheduler, error[:500]]
        return bool(self.lua.run("slot_release", keys=[self._record], args=args))

    # -- warm_start.lua -----------------------------------------------------------

    def start(
        self, lock_ttl_ms: int, slot_ms: int | None, request: str, by: str, timeout_ms: int
    ) -> tuple[int, int]:
        """Start a run: (its number, Redis's clock), (0, the live run's number), or (-1, the
        due time last started) when `slot_ms` was started already."""
        keys = [self._lock, self._fence, self._run, self._chunks, self._record]
        args = [lock_ttl_ms, "" if slot_ms is None else slot_ms, request, by, timeout_ms]
        run, second = self.lua.run("warm_start", keys=keys, args=args)
        return int(run), int(second)

    # -- warm_begin.lua -----------------------------------------------------------

    def begin(self, run: int, lock_ttl_ms: int, horizon_ms: int) -> tuple[bool, str | int]:
        """A chunk begins: (True, its begin time on Redis's clock) or (False, why not)."""
        keys = [self._lock, self._run, self._marker, self._touched]
        ok, value = self.lua.run("warm_begin", keys=keys, args=[run, lock_ttl_ms, horizon_ms])
        return (True, int(value)) if int(ok) else (False, str(value))

    # -- warm_fill.lua ------------------------------------------------------------

    def fill(
        self,
        run: int,
        begun_ms: int,
        horizon_ms: int,
        index: int,
        rows: Sequence[tuple[str, str, int, int]],
        invalid: int,
    ) -> tuple[int, int, int]:
        """Fill a chunk: rows are (key, JSON, px, shard). Returns (filled, skipped, chunks
        done); (-1, 0, 0) when the run is no longer current, (-2, 0, 0) when the chunk
        must be read again (nothing written either way).

        Each key's dirty hash is that of the shard count Redis records, whatever count
        the caller put in `rows` (its shard is taken again from the key): the script
        refuses a count that is not the record's, and the fill is sent again with it."""
        entry = self._entry
        head = [self._run, self._chunks, self._marker, self._touched, self._shards_record]
        entries = [entry + key for key, _, _, _ in rows]
        for _ in range(FILL_TRIES):
            dirty, count = self._dirty, len(self._dirty)
            args: list[Any] = [run, begun_ms, horizon_ms, count, index, invalid]
            for key, value, px, _ in rows:
                args += (key, value, px, shard_of(key, count) + 1)
            reply = self.lua.run("warm_fill", keys=[*head, *dirty, *entries], args=args)
            if int(reply[0]) != -3:
                break
            recorded = int(str(reply[1]).split(">", 1)[0])
            self._dirty = [self._keys.dirty(self._entity, n) for n in range(recorded)]
        else:
            return -2, 0, 0  # the count kept moving: read the chunk again later
        if int(reply[0]) < 0:
            return int(reply[0]), 0, 0
        return int(reply[0]), int(reply[1]), int(reply[2])

    # -- warm_end.lua -------------------------------------------------------------

    def end(self, run: int, verb: str, *extra: str | int) -> str:
        """Record the plan ("planned", chunks, total), fail ("failed", error) or check
        for the end ("check"): the run's state after it."""
        keys = [self._lock, self._run, self._last, self._history]
        return str(self.lua.run("warm_end", keys=keys, args=[run, verb, *extra]))

    # -- warm_keep.lua ------------------------------------------------------------

    def keep(self, run: int, lock_ttl_ms: int) -> bool:
        """Extend the run's lock while it holds it."""
        return bool(self.lua.run("warm_keep", keys=[self._lock], args=[run, lock_ttl_ms]))
