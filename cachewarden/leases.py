"""The read path's Redis side: read-or-lease, fill, batch lease and fill, give up.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis

from cachewarden.keys import Keyspace, shard_of
from cachewarden.scripts import Scripts
from cachewarden.settings import EntitySettings

# After a failed load, readers of the key get its error at once for this long
# (or lock_timeout, if shorter) instead of all loading again.
FAILURE_HOLD_MS = 1000

_tokens = itertools.count()
_host = os.urandom(6).hex()


def new_token() -> str:
    """A lease token unique across hosts (a random prefix), processes (the pid) and calls."""
    return f"{_host}-{os.getpid()}-{next(_tokens)}"


@dataclass(frozen=True)
class Reply:
    """What one read returned: a hit's value and TTL, or a miss's role (see read.lua)."""

    value: str | None
    pttl_ms: int
    flag: int  # hit: 1 if a refresh is queued; miss: a singleflight.Role value
    now_ms: int  # Redis's clock
    extra: str | None  # hit: the refresh delay (ms); miss: the last load's error

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> Reply:
        """Decode the read script's reply."""
        value, pttl, flag, now = raw[0], int(raw[1]), int(raw[2]), int(raw[3])
        extra = raw[4] if len(raw) > 4 else None
        return cls(value, pttl, flag, now, None if extra is None else str(extra))


class EntityLeases:
    """The lease protocol for one entity."""

    def __init__(
        self, redis: Redis, keys: Keyspace, scripts: Scripts, spec: EntitySettings
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts
        self.spec = spec
        name = spec.name
        self._hot = keys.hot(name)
        self._entry = keys.entry_prefix(name)
        self._lease = keys.lease_prefix(name)
        self._marker = keys.refresh_prefix(name)
        self._warm = keys.warm(name)
        self._dirty = [keys.dirty(name, n) for n in range(spec.write_behind.shards)]
        self._stats = keys.read_stats(name)
        self._track_hot = "1" if spec.refresh_ahead > 0 else "0"
        self._want_delay = "1" if spec.early_refresh == "xfetch" else "0"
        self.px_row = spec.ttl_ms + spec.stale_ttl_ms
        self.px_absent = spec.negative_ttl_ms + spec.stale_ttl_ms
        self.failure_hold_ms = min(FAILURE_HOLD_MS, spec.lock_timeout_ms)

    def dirty(self, key: str) -> str:
        """The dirty hash of the key's write-behind shard."""
        return self._dirty[shard_of(key, len(self._dirty))]

    # -- reads ----------------------------------------------------------------

    def _read_call(self, key: str, token: str) -> tuple[list[str], list[Any]]:
        name, ks = self.spec.name, self.keys
        keys = [
            ks.entry(name, key),
            self._hot,
            ks.refresh_queued(name, key),
            ks.lease(name, key),
            self.dirty(key),
            self._stats,
        ]
        spec = self.spec
        args = [
            key,
            spec.stale_ttl_ms,
            token,
            spec.lock_timeout_ms,
            self._track_hot,
            self._want_delay,
        ]
        return keys, args

    def read(self, key: str, token: str) -> Reply:
        """One round trip: the entry (and what the refresh decision needs), or a miss's role."""
        keys, args = self._read_call(key, token)
        return Reply.parse(self.scripts.read(keys=keys, args=args))

    def read_many(self, keys: Sequence[str], token: str) -> list[Reply]:
        """`read` for many keys in one pipelined round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            k, a = self._read_call(key, token)
            self.scripts.read(keys=k, args=a, client=pipe)
        return [Reply.parse(raw) for raw in pipe.execute()]

    # -- fills ----------------------------------------------------------------

    def _fill_call(
        self, key: str, token: str, value: str, mode: str, load_ms: int | None
    ) -> tuple[list[str], list[Any]]:
        name, ks = self.spec.name, self.keys
        keys = [
            ks.entry(name, key),
            ks.lease(name, key),
            self.dirty(key),
            ks.refresh_queued(name, key),
            self._hot,
            self._stats,
            self._warm,
        ]
        px = self.px_absent if value == "null" else self.px_row
        load = "" if load_ms is None else load_ms
        return keys, [key, token, value, px, mode, load, self.spec.stale_ttl_ms]

    def fill(
        self, key: str, token: str, value: str, mode: str = "miss", load_ms: int | None = None
    ) -> tuple[bool, str | None]:
        """Fill one entry under our lease: (filled, the entry's value now)."""
        keys, args = self._fill_call(key, token, value, mode, load_ms)
        raw = self.scripts.fill(keys=keys, args=args)
        return bool(raw[0]), raw[1] if len(raw) > 1 else None

    def fill_each(
        self, values: Mapping[str, str], token: str, load_ms: int | None = None
    ) -> dict[str, tuple[bool, str | None]]:
        """`fill` (miss mode) for many keys in one pipelined round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for key, value in values.items():
            k, a = self._fill_call(key, token, value, "miss", load_ms)
            self.scripts.fill(keys=k, args=a, client=pipe)
        return {
            key: (bool(raw[0]), raw[1] if len(raw) > 1 else None)
            for key, raw in zip(values, pipe.execute(), strict=True)
        }

    # -- batch refresh --------------------------------------------------------

    def lease_many(self, keys: Sequence[str], token: str, horizon_ms: int | None) -> list[str]:
        """Lease the keys that need a reload (see lease_many.lua); return those leased."""
        names: list[str] = []
        entry, lease = self._entry, self._lease
        for key in keys:
            names += [entry + key, lease + key, self.dirty(key)]
        args = [
            token,
            self.spec.lock_timeout_ms,
            "" if horizon_ms is None else horizon_ms,
            self.spec.stale_ttl_ms,
            *keys,
        ]
        positions = self.scripts.lease_many(keys=names, args=args)
        return [keys[int(p) - 1] for p in positions]

    def fill_many(self, values: Mapping[str, str], token: str, requested_at_ms: int | None) -> int:
        """Fill a batch under our leases (one script call); return how many landed."""
        names = [self._hot, self._stats, self._warm]
        entry, lease, marker = self._entry, self._lease, self._marker
        args: list[Any] = [
            token,
            self.px_row,
            self.px_absent,
            "" if requested_at_ms is None else requested_at_ms,
            self.spec.stale_ttl_ms,
        ]
        for key, value in values.items():
            names += [entry + key, lease + key, self.dirty(key), marker + key]
            args += [key, value]
        return int(self.scripts.fill_many(keys=names, args=args))

    def give_up(
        self, keys: Iterable[str], token: str, error: str | None = None, counter: str = ""
    ) -> int:
        """Release our leases; with an `error`, hold it briefly for the keys' readers."""
        names = [self._stats, *(self.keys.lease(self.spec.name, k) for k in keys)]
        hold = self.failure_hold_ms if error is not None else 0
        return int(
            self.scripts.lease_fail(keys=names, args=[token, (error or "")[:500], hold, counter])
        )

    def mark_refresh(self, keys: Sequence[str]) -> list[str]:
        """Set the refresh markers not set yet; return the keys whose marker we set."""
        ttl = self.spec.lock_timeout_ms
        name = self.spec.name
        if len(keys) == 1:
            ok = self.redis.set(self.keys.refresh_queued(name, keys[0]), "1", nx=True, px=ttl)
            return list(keys) if ok else []
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.set(self.keys.refresh_queued(name, key), "1", nx=True, px=ttl)
        return [k for k, ok in zip(keys, pipe.execute(), strict=True) if ok]

    def counters(self) -> dict[str, int]:
        """The entity's read-path counters in Redis (loads, refreshed, errors, delay_ms)."""
        raw: dict[str, str] = self.redis.hgetall(self._stats)  # type: ignore[assignment]
        return {k: int(float(v)) for k, v in raw.items()}
