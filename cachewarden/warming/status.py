"""What the warming runs recorded in Redis, read for `cachewarden jobs` and `warm`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis import Redis

from cachewarden.keys import Keyspace

_NUMBERS = (
    "run",
    "started_ms",
    "finished_ms",
    "timeout_ms",
    "planned",
    "chunks",
    "chunks_done",
    "total",
    "rows",
    "filled",
    "skipped",
    "invalid",
)


@dataclass(frozen=True)
class Run:
    """One run as its hash records it."""

    fields: dict[str, Any]

    @classmethod
    def parse(cls, raw: dict[str, str]) -> Run | None:
        """A run from its hash (None for an empty hash)."""
        if not raw:
            return None
        fields: dict[str, Any] = dict(raw)
        for name in _NUMBERS:
            if fields.get(name, "") != "":
                fields[name] = int(fields[name])
        return cls(fields)

    def __getitem__(self, name: str) -> Any:
        return self.fields.get(name)

    @property
    def state(self) -> str:
        return str(self.fields.get("state", "?"))

    @property
    def duration_ms(self) -> int | None:
        """How long it ran (None while it runs)."""
        end = self.fields.get("finished_ms")
        return None if end in (None, "") else int(end) - int(self["started_ms"])

    @property
    def complete(self) -> bool:
        """Done, and every row it read is in the cache (filled, or newer from a write)."""
        return self.state == "done" and not self["invalid"] and self["rows"] == self["total"]


def read_runs(
    redis: Redis, keys: Keyspace, job: str
) -> tuple[Run | None, Run | None, dict[str, str]]:
    """(the current or latest run, the latest finished run, the schedule record)."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.run(job))
        pipe.hgetall(keys.last_run(job))
        pipe.hgetall(keys.job(job))
        pipe.get(keys.run_lock(job))
        current, last, record, lock = pipe.execute()
    run = Run.parse(current)
    if run is not None and run.state == "running" and lock != str(run["run"]):
        # No process holds it any more: a newer due time starts another.
        run = Run({**run.fields, "state": "abandoned"})
    return run, Run.parse(last), record
