"""The read path's scripts, one typed method per `.lua` file: the Redis side of leases.

This is Facebook memcache's lease protocol on Redis, joined to the write
path: a loader takes the key's lease (`SET lease token NX PX lock_timeout`,
refused while a write of the key is pending) before it reads the database,
and its fill lands only if the lease still holds its token and no write is
pending. Every `write()` and `delete()` deletes the lease, so a load that
began before a write can never put an older value over it (invariant 3),
and one lease per key admits one loader (invariant 4).

Entries are stored with their TTL plus the entity's `stale_ttl`, so the
last `stale_ttl` of an entry's life in Redis is its stale grace.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from cachewarden.codec import ABSENT
from cachewarden.keys import Keyspace, shard_of
from cachewarden.scripts import Registry, ScriptCall
from cachewarden.settings import EntitySettings

# After a failed load, readers of the key get its error at once for this long
# (or lock_timeout, if shorter) instead of all loading again.
FAILURE_HOLD_MS = 1000

_tokens = itertools.count()
_host = os.urandom(6).hex()
_prefix = f"{_host}-{os.getpid()}-"


def _forked() -> None:
    global _prefix
    _prefix = f"{_host}-{os.getpid()}-"


os.register_at_fork(after_in_child=_forked)


def preload(lua: Registry) -> None:
    """Load the scripts of a read and its miss's fill, on the registry's connection."""
    lua.preload(("read", "fill"))


def failure_hold_ms(spec: EntitySettings) -> int:
    """How long a failed load's error is held for the key's readers (see lease_fail.lua)."""
    return min(FAILURE_HOLD_MS, spec.lock_timeout_ms)


def new_token() -> str:
    """A lease token unique across hosts (a random prefix), processes (the pid) and calls."""
    return _prefix + str(next(_tokens))


class Reply(NamedTuple):
    """What one read returned: a hit's value and TTL, or a miss's role (see read.lua)."""

    value: str | None
    pttl_ms: int
    flag: int  # hit: 1 if this read asked for a refresh; miss: a singleflight.Role value
    now_ms: int  # Redis's clock
    extra: str | None  # hit: the refresh delay (ms); miss: the last load's error

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> Reply:
        """Decode the read script's reply (its integers arrive as ints)."""
        return cls(raw[0], raw[1], raw[2], raw[3], raw[4] if len(raw) > 4 else None)


@dataclass(frozen=True)
class Candidates:
    """What `sweep_candidates` found: the horizon and the keys from each index."""

    horizon_ms: int
    hot: list[str]
    warm: list[str]


class ReadScripts:
    """The read path's scripts for one entity: read, fill, lease, give up, sweep.

    A key's dirty hash is that of its shard at the count Redis records, which the
    caller tells: `known()`, the count it last saw (no read of its own: a read stays
    one round trip), for read.lua, whose dirty check only decides who loads; and
    `current()`, read again at most every second, for the scripts that write an entry
    (fill, fill_many) or lease a reload (lease_many), where a stale count could put a
    database row over a pending write in a shard the old count lacks. Without them:
    the config's count. (read_scripts in readpath/refresh.py passes shardcount's.)"""

    def __init__(
        self,
        lua: Registry,
        keys: Keyspace,
        spec: EntitySettings,
        known: Callable[[], int] | None = None,
        current: Callable[[], int] | None = None,
    ) -> None:
        self.lua = lua
        self.redis = lua.client
        self.keys = keys
        self.spec = spec
        name = spec.name
        self._hot = keys.hot(name)
        self._warm = keys.warm(name)
        self._stats = keys.read_stats(name)
        self._requests = keys.refresh_requests(name)
        self._entry = keys.entry_prefix(name)
        self._lease = keys.lease_prefix(name)
        self._marker = keys.refresh_prefix(name)
        configured = spec.write_behind.shards
        self._known = known if known is not None else lambda: configured
        self._current = current if current is not None else self._known
        self._dirty_of: dict[int, list[str]] = {}  # count -> its dirty hashes
        self._read = lua.script("read")
        # The read's arguments after the key and the token, fixed per entity.
        self._track_hot = "1" if spec.refresh_ahead > 0 else "0"
        self._want_delay = "1" if spec.early_refresh == "xfetch" else "0"
        self.px_row = spec.ttl_ms + spec.stale_ttl_ms
        self.px_absent = spec.negative_ttl_ms + spec.stale_ttl_ms
        self.failure_hold_ms = failure_hold_ms(spec)

    def _dirty(self, fresh: bool) -> list[str]:
        """The dirty hashes of the count Redis records: as last seen, or (`fresh`) as
        read at most a second ago. Built once per count."""
        count = self._current() if fresh else self._known()
        found = self._dirty_of.get(count)
        if found is None:
            found = [self.keys.dirty(self.spec.name, n) for n in range(count)]
            self._dirty_of[count] = found
        return found

    def dirty(self, key: str, fresh: bool = False) -> str:
        """The dirty hash of the key's write-behind shard, at the count Redis records as
        last seen (`fresh`: as read at most a second ago)."""
        dirty = self._dirty(fresh)
        return dirty[shard_of(key, len(dirty))]

    # -- read.lua -------------------------------------------------------------

    def read_call(
        self,
        key: str,
        token: str,
        refresh_below_ms: tuple[float, float],
        counts: tuple[int, int] = (0, 0),
    ) -> ScriptCall:
        """read.lua's call (`read` sends it; so does the asyncio reader)."""
        spec = self.spec
        keys = [
            self._entry + key,
            self._hot,
            self._marker + key,
            self._lease + key,
            self.dirty(key),
            self._stats,
            self._requests,
        ]
        args = [
            key,
            spec.stale_ttl_ms,
            token,
            spec.lock_timeout_ms,
            self._track_hot,
            int(refresh_below_ms[0]),
            int(refresh_below_ms[1]),
            self._want_delay,
            counts[0],
            counts[1],
        ]
        return ScriptCall("read", keys, args)

    def read(
        self,
        key: str,
        token: str,
        refresh_below_ms: tuple[float, float] = (0, 0),
        counts: tuple[int, int] = (0, 0),
    ) -> Reply:
        """One round trip: the entry (and what the refresh decision needs), or a miss's role.

        A hit with at most `refresh_below_ms` left (for a row, for a known-absent
        entry) records a refresh request, unless one is queued for the key already.
        `counts` (hits, misses) are added to the entity's read counters.
        """
        return Reply.parse(self.lua.call(*self.read_call(key, token, refresh_below_ms, counts)))

    def read_many(
        self,
        keys: Sequence[str],
        token: str,
        refresh_below_ms: tuple[float, float] = (0, 0),
        counts: tuple[int, int] = (0, 0),
    ) -> list[Reply]:
        """`read` for many keys in one pipelined round trip (`counts` ride on the first)."""
        pipe = self.redis.pipeline(transaction=False)
        for n, key in enumerate(keys):
            call = self.read_call(key, token, refresh_below_ms, counts if n == 0 else (0, 0))
            self.lua.run(*call, client=pipe)
        return [Reply.parse(raw) for raw in pipe.execute()]

    # -- fill.lua -------------------------------------------------------------

    def fill_call(
        self, key: str, token: str, value: str, load_ms: int | None, dirty: list[str] | None = None
    ) -> ScriptCall:
        """fill.lua's call (`dirty`: the dirty hashes of the recorded count, read
        at most a second ago when not given, which may read Redis: the asyncio reader
        builds them on its loader thread)."""
        if dirty is None:
            dirty = self._dirty(fresh=True)
        keys = [
            self._entry + key,
            self._lease + key,
            dirty[shard_of(key, len(dirty))],
            self._marker + key,
            self._hot,
            self._stats,
            self._warm,
        ]
        args = [
            key,
            token,
            value,
            self.px_absent if value == ABSENT else self.px_row,
            "" if load_ms is None else load_ms,
            self.spec.stale_ttl_ms,
        ]
        return ScriptCall("fill", keys, args)

    def fill(
        self, key: str, token: str, value: str, load_ms: int | None = None
    ) -> tuple[bool, str | None]:
        """Fill one absent entry under our lease: (filled, the entry's value now)."""
        return filled_reply(self.lua.call(*self.fill_call(key, token, value, load_ms)))

    def fill_each(
        self, values: Mapping[str, str], token: str, load_ms: int | None = None
    ) -> dict[str, tuple[bool, str | None]]:
        """`fill` for many keys in one pipelined round trip."""
        pipe, dirty = self.redis.pipeline(transaction=False), self._dirty(fresh=True)
        for key, value in values.items():
            self.lua.run(*self.fill_call(key, token, value, load_ms, dirty), client=pipe)
        return {key: filled_reply(raw) for key, raw in zip(values, pipe.execute(), strict=True)}

    # -- lease_many.lua, fill_many.lua: batch reloads ---------------------------

    def lease_many(self, keys: Sequence[str], token: str, horizon_ms: int | None) -> list[str]:
        """Lease the keys that need a reload (see lease_many.lua); return those leased."""
        names: list[str] = []
        entry, lease, dirty = self._entry, self._lease, self._dirty(fresh=True)
        for key in keys:
            names += [entry + key, lease + key, dirty[shard_of(key, len(dirty))]]
        args = [
            token,
            self.spec.lock_timeout_ms,
            "" if horizon_ms is None else horizon_ms,
            self.spec.stale_ttl_ms,
            *keys,
        ]
        positions = self.lua.run("lease_many", keys=names, args=args)
        return [keys[int(p) - 1] for p in positions]

    def fill_many(self, values: Mapping[str, str], token: str) -> int:
        """Fill a batch under our leases (one script call); return how many landed."""
        names = [self._hot, self._stats, self._warm]
        entry, lease, marker = self._entry, self._lease, self._marker
        dirty = self._dirty(fresh=True)
        args: list[Any] = [token, self.px_row, self.px_absent, self.spec.stale_ttl_ms]
        for key, value in values.items():
            names += [entry + key, lease + key, dirty[shard_of(key, len(dirty))], marker + key]
            args += [key, value]
        return int(self.lua.run("fill_many", keys=names, args=args))

    # -- lease_fail.lua -------------------------------------------------------

    def give_up(
        self, keys: Iterable[str], token: str, error: str | None = None, counter: str = ""
    ) -> int:
        """Release our leases; with an `error`, hold it briefly for the keys' readers."""
        return int(self.lua.run(*self.give_up_call(keys, token, error, counter)))

    def give_up_call(
        self, keys: Iterable[str], token: str, error: str | None = None, counter: str = ""
    ) -> ScriptCall:
        """lease_fail.lua's call (`give_up` sends it; so does the asyncio reader)."""
        names = [self._stats, *(self._lease + k for k in keys)]
        hold = self.failure_hold_ms if error is not None else 0
        return ScriptCall("lease_fail", names, [token, (error or "")[:500], hold, counter])

    # -- lease_extend.lua ------------------------------------------------------

    def extend(self, keys: Iterable[str], token: str) -> int:
        """Extend our leases of `keys` by `lock_timeout` while their load runs: how many
        were still ours."""
        names = [self._lease + k for k in keys]
        return int(
            self.lua.run("lease_extend", keys=names, args=[token, self.spec.lock_timeout_ms])
        )

    # -- sweep_candidates.lua, sweep_claim.lua ----------------------------------

    def sweep_candidates(self, window_ms: int, most: int) -> Candidates:
        """The hot, then warm, keys scored within `window_ms` from now (at most `most`)."""
        raw = self.lua.run("sweep_candidates", keys=[self._hot, self._warm], args=[window_ms, most])
        horizon, hot_count, members = int(raw[0]), int(raw[1]), [str(m) for m in raw[2:]]
        return Candidates(horizon, members[:hot_count], members[hot_count:])

    def sweep_claim(self, found: Candidates) -> list[str]:
        """Claim the candidates whose entries expire by the horizon (see sweep_claim.lua)."""
        candidates = [*found.hot, *found.warm]
        if not candidates:
            return []
        names = [self._hot, self._warm]
        for key in candidates:
            names += [self._entry + key, self._marker + key]
        spec = self.spec
        args: list[Any] = [
            found.horizon_ms,
            spec.stale_ttl_ms,
            spec.lock_timeout_ms,
            spec.ttl_ms,
            len(found.hot),
            *candidates,
        ]
        return [str(k) for k in self.lua.run("sweep_claim", keys=names, args=args)]

    # -- refresh requests (plain commands) ---------------------------------------

    def take_requests(self, most: int) -> list[tuple[str, float]]:
        """Pop up to `most` refresh requests: (key, horizon_ms), most urgent first."""
        popped: list[tuple[str, float]] = self.redis.zpopmin(self._requests, most)  # type: ignore[assignment]
        return popped


def filled_reply(raw: Sequence[Any]) -> tuple[bool, str | None]:
    return bool(raw[0]), raw[1] if len(raw) > 1 else None
