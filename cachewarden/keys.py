"""Every Redis key name cachewarden uses, built in this one module.

Layout (prefix "cw", entity "user", shard 3):

    cw:user:42                 cache entry: the row as a JSON object ("null": known absent)
    cw:@wb:user:3              write stream of one shard: its operations not yet settled
    cw:@wb:user:3:dirty        hash: key -> stream id of its newest unflushed write
    cw:@wb:due                 sorted set: "user:3" -> when that shard must be flushed (ms)
    cw:@wb:confirm             written by each durability confirmation before its WAIT/WAITAOF
    cw:@wb:user:3:queued       a flush of this shard is queued or running
    cw:@wb:user:3:retry        consecutive failed flushes (drives the backoff)
    cw:@wb:user:dead           dead-letter stream of rows the database rejected
    cw:@wb:user:dead:keys      hash: key -> id of its newest dead letter
    cw:@lock:flush:user:3      the shard's flusher lock (value: owner token)
    cw:@fence:flush:user:3     the shard's fencing-token counter
    cw:@lease:user:42          a loader's lease on one key; any write or delete voids it
    cw:@refresh:user:42        marker: a refresh of this key is queued (deduplicates them);
                               its value is when it was asked for (ms)
    cw:@refreshq:user          sorted set: key -> horizon (ms), refreshes asked for by reads,
                               which the workers send as batched refresh tasks
    cw:@hot:user               sorted set: key -> the entry's expiry (ms), for keys read
                               since their last load; the sweep reloads these before expiry
    cw:@warm:user              sorted set: key -> expiry, for keys reloaded and not read
                               since; the sweep reloads each once more, then drops it
    cw:@read:user              hash: read-path counters (loads, refreshed, load_errors, ...)
    cw:@sweep:user             guard: the hot-key sweep of this entity ran in this period
    cw:@wb:user:stats          hash: the last flush of the entity (last_flush_ms, rows)
    cw:@workers                sorted set: worker node -> when its dispatcher last beat (ms)
    cw:@warming:user           marker: a warm run of this entity is reading (value: since, ms)
    cw:@touched:user           sorted set: key -> when a flush settled it while warming (ms)
    cw:@job:nightly            hash: the warming job's schedule record (last slot fired, ...)
    cw:@job:nightly:run        hash: its current (or latest) run: state, counters, error
    cw:@job:nightly:last       hash: its latest finished run
    cw:@job:nightly:chunks     hash: chunk index -> rows, of the current run
    cw:@job:nightly:history    list: summaries of its latest runs (JSON), newest first
    cw:@lock:warm:nightly      the job's run lock (value: the run's number)
    cw:@fence:warm:nightly     counter handing out the job's run numbers (fencing tokens)

Keys of cache entries never contain ':' so they cannot meet the internal names,
which all sit under "@" (not allowed in entity names).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


def shard_of(key: str, shards: int) -> int:
    """The shard a key's writes go to: CRC-32 (zlib, IEEE) of its UTF-8 bytes mod shards."""
    return zlib.crc32(key.encode("utf-8")) % shards


@dataclass(frozen=True)
class Keyspace:
    """Builds key names under one prefix."""

    prefix: str

    def entry(self, entity: str, key: str) -> str:
        """The cache entry holding one row."""
        return f"{self.entry_prefix(entity)}{key}"

    def entry_prefix(self, entity: str) -> str:
        """What precedes the key in an entry's name (scripts append keys to it)."""
        return f"{self.prefix}:{entity}:"

    def entry_pattern(self, entity: str) -> str:
        """A SCAN pattern for every cache entry of an entity."""
        return f"{self.prefix}:{entity}:*"

    def stream(self, entity: str, shard: int) -> str:
        """The write stream of one shard."""
        return f"{self.prefix}:@wb:{entity}:{shard}"

    def confirm_marker(self) -> str:
        """Written by each durability confirmation just before its WAIT or WAITAOF."""
        return f"{self.prefix}:@wb:confirm"

    def memory_mark(self) -> str:
        """ "ok" (100 ms) or "<used> <max>" (1 s, writes refused): enqueue.lua's memory look."""
        return f"{self.prefix}:@wb:memory"

    def shard_count(self, entity: str) -> str:
        """The entity's recorded shard count ("N", or "N>M" while resharding to M)."""
        return f"{self.prefix}:@wb:{entity}:shards"

    def dirty(self, entity: str, shard: int) -> str:
        """Key -> stream id of the newest unflushed write, for one shard."""
        return f"{self.stream(entity, shard)}:dirty"

    def due(self) -> str:
        """Sorted set of shards with unflushed writes, scored by their flush deadline."""
        return f"{self.prefix}:@wb:due"

    def queued(self, entity: str, shard: int) -> str:
        """Marker: a flush of this shard is queued or running."""
        return f"{self.stream(entity, shard)}:queued"

    def retries(self, entity: str, shard: int) -> str:
        """Count of consecutive failed flushes of this shard."""
        return f"{self.stream(entity, shard)}:retry"

    def dead(self, entity: str) -> str:
        """Dead-letter stream of one entity."""
        return f"{self.prefix}:@wb:{entity}:dead"

    def dead_keys(self, entity: str) -> str:
        """Key -> id of its newest dead letter (cleared by any newer write)."""
        return f"{self.dead(entity)}:keys"

    def lease(self, entity: str, key: str) -> str:
        """A loader's lease on one key (value: its token); every write or delete deletes it."""
        return f"{self.lease_prefix(entity)}{key}"

    def lease_prefix(self, entity: str) -> str:
        """What precedes the key in a lease's name."""
        return f"{self.prefix}:@lease:{entity}:"

    def tombstone(self, entity: str, key: str) -> str:
        """The version of the key's last versioned delete (for `tombstone_ttl`)."""
        return f"{self.tombstone_prefix(entity)}{key}"

    def tombstones(self, entity: str) -> str:
        """Set while any tombstone of the entity may live (writes skip the look otherwise)."""
        return f"{self.prefix}:@tomb:{entity}"

    def tombstone_prefix(self, entity: str) -> str:
        """What precedes the key in a tombstone's name."""
        return f"{self.prefix}:@tomb:{entity}:"

    def refresh_queued(self, entity: str, key: str) -> str:
        """Marker: a refresh of this key is queued; set only if absent, cleared by a fill."""
        return f"{self.refresh_prefix(entity)}{key}"

    def refresh_prefix(self, entity: str) -> str:
        """What precedes the key in a refresh marker's name (scripts append keys to it)."""
        return f"{self.prefix}:@refresh:{entity}:"

    def refresh_requests(self, entity: str) -> str:
        """Sorted set of keys whose reads asked for a refresh, scored by the reload's horizon."""
        return f"{self.prefix}:@refreshq:{entity}"

    def hot(self, entity: str) -> str:
        """Sorted set of keys read since their last load, scored by the entry's expiry (ms)."""
        return f"{self.prefix}:@hot:{entity}"

    def warm(self, entity: str) -> str:
        """Sorted set of keys reloaded while hot and not read since (one grace reload)."""
        return f"{self.prefix}:@warm:{entity}"

    def read_stats(self, entity: str) -> str:
        """Hash of read-path counters of one entity."""
        return f"{self.prefix}:@read:{entity}"

    def sweep_guard(self, entity: str) -> str:
        """Guard that admits one hot-key sweep of an entity per sweep period."""
        return f"{self.prefix}:@sweep:{entity}"

    def flush_stats(self, entity: str) -> str:
        """The entity's last flush: when, and how many rows it applied."""
        return f"{self.prefix}:@wb:{entity}:stats"

    def workers(self) -> str:
        """Worker node -> when its dispatcher loop last beat (ms), for `status`."""
        return f"{self.prefix}:@workers"

    def warming(self, entity: str) -> str:
        """Marker: a warm run of the entity is reading rows (value: since when, ms)."""
        return f"{self.prefix}:@warming:{entity}"

    def touched(self, entity: str) -> str:
        """Sorted set: key -> when a flush settled it while a warm run was reading (ms)."""
        return f"{self.prefix}:@touched:{entity}"

    def job(self, job: str) -> str:
        """A warming job's schedule record: the last slot fired, by whom, missed slots."""
        return f"{self.prefix}:@job:{job}"

    def run(self, job: str) -> str:
        """The job's current (or latest) run: its number, state, counters and error."""
        return f"{self.job(job)}:run"

    def last_run(self, job: str) -> str:
        """The job's latest finished run."""
        return f"{self.job(job)}:last"

    def run_chunks(self, job: str) -> str:
        """Chunk index -> rows, for the chunks of the current run that are done."""
        return f"{self.job(job)}:chunks"

    def run_history(self, job: str) -> str:
        """Summaries (JSON) of the job's latest runs, newest first."""
        return f"{self.job(job)}:history"

    def run_lock(self, job: str) -> str:
        """The lock a run of the job holds while it lives (value: its run number)."""
        return f"{self.prefix}:@lock:warm:{job}"

    def run_fence(self, job: str) -> str:
        """Counter handing out the job's run numbers, which fence off older runs."""
        return f"{self.prefix}:@fence:warm:{job}"

    def flush_lock(self, entity: str, shard: int) -> str:
        """The lock that admits one flusher per shard."""
        return f"{self.prefix}:@lock:flush:{entity}:{shard}"

    def flush_fence(self, entity: str, shard: int) -> str:
        """Counter handing out the shard's fencing tokens."""
        return f"{self.prefix}:@fence:flush:{entity}:{shard}"


def due_member(entity: str, shard: int) -> str:
    """A shard's member name in the due set."""
    return f"{entity}:{shard}"


def parse_due_member(member: str) -> tuple[str, int]:
    """The (entity, shard) a due-set member names."""
    entity, _, shard = member.rpartition(":")
    return entity, int(shard)
