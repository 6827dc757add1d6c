"""What the core measures, told to whoever listens: the worker's Prometheus exporter.

The library imports nothing to measure: with no listener, `emit` costs one empty
loop. The worker installs its listener (`cachewarden.operator.exporter`) at
start. Events:

    flush_batch_rows   entity          rows in one flush batch (a histogram)
    flush_rows         entity          rows a flush applied to the database
    flush_seconds      entity          one flush task's duration
    flush_failures     entity, status  a flush that backed off or was fenced
    flush_lock_busy    entity          a flush that found its shard's lock held
    refreshed_rows     entity          entries a refresh-ahead reload filled
    reads_from_database entity         keys read from the database as Redis failed
    reads_from_database_refused entity keys that found no turn for that (raised)
    warm_rows          job             rows a warm chunk put in the cache (or left to a write)
    warm_runs          job, outcome    a warm run that ended (value: its seconds)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

Listener = Callable[[str, float, Mapping[str, str]], None]
_listeners: list[Listener] = []


def listen(listener: Listener) -> None:
    """Receive every event from now on (the worker's exporter)."""
    _listeners.append(listener)


def emit(event: str, value: float = 1.0, **labels: str) -> None:
    """Tell the listeners, if any, that `event` happened (with `value`)."""
    for listener in _listeners:
        listener(event, value, labels)
