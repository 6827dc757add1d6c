"""Lua scripts, kept as .lua files beside this loader and registered once per client."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from redis import Redis
from redis.commands.core import Script


@cache
def _source(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def source(name: str) -> str:
    """The text of one script, for clients in other languages (`EVAL`)."""
    return _source(name)


@dataclass(frozen=True)
class Scripts:
    """The scripts registered on one Redis client (EVALSHA, reloaded on NOSCRIPT)."""

    enqueue: Script
    finish: Script
    lock_acquire: Script
    lock_extend: Script
    release: Script
    replay: Script
    dispatch: Script
    read: Script
    fill: Script
    lease_many: Script
    fill_many: Script
    lease_fail: Script
    sweep_claim: Script

    @classmethod
    def register(cls, client: Redis) -> Scripts:
        """Register every script on `client`."""
        return cls(
            **{name: client.register_script(_source(name)) for name in cls.__dataclass_fields__}
        )
