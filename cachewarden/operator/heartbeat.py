"""Liveness and readiness of a worker, as files that a probe can read without a broadcast.

A worker's consumer touches `<dir>/<node>.consumer` from its own event loop every
second, its dispatcher loop touches `<dir>/<node>.dispatcher` after every pass,
and `<dir>/<node>.ready` exists once it consumes its queues (it lists them).
`cachewarden probe live` fails when either heartbeat is older than the liveness
timeout: a worker whose consumer or dispatcher is stuck, not only a dead one.
Local files, so a probe costs no Redis or broker round trip and a Redis outage
does not fail it (the loops keep beating through one).

The directory is private (`cachewarden.runtime`: mode 0700, this user's, refused
otherwise) and no file in it is written through a symbolic link.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cachewarden import runtime

BEATS = ("consumer", "dispatcher")
SETTING = "[monitoring] dir"


def node_file(directory: str, node: str, kind: str) -> Path:
    """The file of one node's heartbeat (`consumer`, `dispatcher`) or `ready` marker."""
    safe = node.replace("/", "_")
    return Path(directory) / f"{safe}.{kind}"


def beat(directory: str, node: str, kind: str) -> None:
    """Record that `kind` of `node` made progress now."""
    runtime.ensure_dir(directory, SETTING)
    path = node_file(directory, node, kind)
    try:
        runtime.touch_file(path)
    except FileNotFoundError:  # the directory went away (a temp cleaner): make it again
        runtime.private_dir(directory, SETTING)
        runtime.touch_file(path)


def mark_ready(directory: str, node: str, queues: list[str]) -> None:
    """Record that `node` consumes `queues`."""
    runtime.private_dir(directory, SETTING)
    runtime.replace_file(node_file(directory, node, "ready"), "\n".join(queues) + "\n")


def clear(directory: str, node: str) -> None:
    """Forget `node` (at its shutdown): its probes fail from now on."""
    for kind in (*BEATS, "ready"):
        node_file(directory, node, kind).unlink(missing_ok=True)


@dataclass(frozen=True)
class Health:
    """What a node's files say."""

    node: str
    ages_s: dict[str, float | None]  # per beat: seconds since it, None: never
    queues: list[str]

    def live(self, timeout_s: float) -> bool:
        return all(age is not None and age <= timeout_s for age in self.ages_s.values())

    @property
    def ready(self) -> bool:
        return bool(self.queues)


def nodes(directory: str) -> list[str]:
    """The nodes with any file in `directory`."""
    found = set()
    for path in Path(directory).glob("*.*"):
        name, _, kind = path.name.rpartition(".")
        if kind in (*BEATS, "ready"):
            found.add(name)
    return sorted(found)


def health(directory: str, node: str) -> Health:
    """Read one node's files."""
    now = time.time()
    ages: dict[str, float | None] = {}
    for kind in BEATS:
        try:
            ages[kind] = now - node_file(directory, node, kind).stat().st_mtime
        except FileNotFoundError:
            ages[kind] = None
    try:
        queues = node_file(directory, node, "ready").read_text().split()
    except FileNotFoundError:
        queues = []
    return Health(node, ages, queues)
