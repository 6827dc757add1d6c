"""The one error tree of cachewarden.

Driver errors (redis-py, SQLAlchemy) are translated where they enter, so callers
catch these and nothing else. Every message names the entity, key or file and
says what to do about it.
"""

from __future__ import annotations


class CachewardenError(Exception):
    """Root of every error cachewarden raises on purpose."""


class ConfigError(CachewardenError):
    """The configuration file or environment is invalid."""

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        super().__init__(f"{source}: {field}: {problem}")


class UnknownEntity(CachewardenError):
    """An operation named an entity the configuration does not define."""


class UnknownJob(CachewardenError):
    """An operation named a warming job the configuration does not define."""


class WarmFailed(CachewardenError):
    """A warming run failed: its query, its result, or the database; names the job."""


class InvalidKey(CachewardenError):
    """A cache key cannot be used (empty, too long, or holds a reserved character)."""


class InvalidValue(CachewardenError):
    """A row cannot be stored: not JSON-encodable, not an object, or over the size limit."""


class Backpressure(CachewardenError):
    """A write buffer shard is full; the write was not taken. Retry later or scale flushers."""


class DurabilityUnconfirmed(CachewardenError):
    """A write was taken and buffered, but its durability was not confirmed in time.

    Raised under `durability = "fsync"` or `"replicas"` when WAITAOF or WAIT did not
    confirm the write within `durability_timeout` (or Redis stopped answering while
    it was asked). The write will be flushed unless a crash or a failover loses it;
    retrying it is safe: the flush is an idempotent upsert (with a version column a
    retry is harmless, without one the last write still wins). `result` holds a batch
    call's per-key outcomes (write_many, delete_many), else None."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class Outranked(CachewardenError):
    """A versioned write or delete was not taken: a newer delete of its key outranks it."""

    def __init__(self, entity: str, key: str, op: str, version: str, newer: str) -> None:
        self.entity = entity
        self.key = key
        self.op = op
        self.version = version
        self.newer = newer
        super().__init__(
            f"{entity}:{key}: the {op} at version {version} was not taken: the key was "
            f"deleted at version {newer}, which outranks it (for entities.{entity}."
            f"tombstone_ttl). Write a version above {newer} to bring the row back, or drop "
            "this one: it is older than the delete"
        )

    def __reduce__(self) -> tuple[type[Outranked], tuple[str, str, str, str, str]]:
        return (Outranked, (self.entity, self.key, self.op, self.version, self.newer))


class BackendUnavailable(CachewardenError):
    """Redis or the database cannot be reached or refused the connection."""


class UnsafeRedis(CachewardenError):
    """Redis is configured so that it could evict or lose the write buffer."""


class UnsafePath(CachewardenError):
    """A runtime directory or file is not private to this user (a symbolic link, another
    owner, or open to others); the message names the path and the fix."""


class LockLost(CachewardenError):
    """A lock or fencing token was taken over by a newer holder; stop without committing."""


class FlushFailed(CachewardenError):
    """A flush could not apply its batch (database down or refusing, Redis down, lock
    lost). Its entries stay pending and the shard is sent again after its backoff."""


class RefreshFailed(CachewardenError):
    """A refresh or sweep could not reload its keys (database or Redis failing); the
    entries keep their value and the keys are asked for again later."""


class LoadFailed(CachewardenError):
    """Loading a key from the database failed (or waiting for its loader timed out)."""

    def __init__(self, entity: str, key: str, problem: str) -> None:
        self.entity = entity
        self.key = key
        self.problem = problem
        super().__init__(f"{entity}:{key}: {problem}")

    def __reduce__(self) -> tuple[type[LoadFailed], tuple[str, str, str]]:
        return (LoadFailed, (self.entity, self.key, self.problem))
