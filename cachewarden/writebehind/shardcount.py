"""The recorded shard count of each entity's write buffer.

A key's shard is `crc32(key) % shards`: two writers with different counts would
put one key's writes on two streams, which two flushers could apply out of
order. So the first write records the count in Redis (`enqueue.lua`), every
writer's count is checked against the record there, and a `Cache` or worker
whose config disagrees refuses to start (`check_shards`). `reshard.py` changes it.
"""

from __future__ import annotations

from typing import cast

from cachewarden.context import Context
from cachewarden.errors import Backpressure, ConfigError
from cachewarden.settings import EntitySettings


def check_shards(context: Context) -> None:
    """Record each entity's shard count where none is; raise ConfigError naming both
    counts where the record differs from the config (or a reshard is running)."""
    redis, keys = context.redis, context.keys
    for spec in context.settings.entities.values():
        ours = str(spec.write_behind.shards)
        record = keys.shard_count(spec.name)
        recorded = cast("str | None", redis.get(record))
        if recorded is None:  # (only then a write: this runs at maxmemory too)
            redis.set(record, ours, nx=True)
            recorded = cast("str | None", redis.get(record))
        if recorded is not None and recorded != ours:
            refusal = shards_refusal(spec, recorded)
            if isinstance(refusal, ConfigError):
                raise refusal
            raise ConfigError(
                "the config", f"entities.{spec.name}.write_behind.shards", str(refusal)
            )


def shards_refusal(spec: EntitySettings, recorded: str) -> ConfigError | Backpressure:
    """Why a writer whose shard count is not the one Redis records may not write."""
    ours = spec.write_behind.shards
    if ">" in recorded:
        old, new = recorded.split(">")
        return Backpressure(
            f"{spec.name}: the write buffer is being resharded from {old} to {new} shards "
            "(cachewarden reshard); writes are taken again once it has drained"
        )
    return ConfigError(
        "the config",
        f"entities.{spec.name}.write_behind.shards",
        f"says {ours}, but Redis records {recorded} shards for this entity's write buffer; "
        f"a key would map to another stream. Set it back to {recorded}, or run "
        f"`cachewarden reshard {spec.name} {ours}` to move the buffer to {ours} shards",
    )
