"""Celery's task events as a test sees them: what Flower and metrics are built from."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery

from cachewarden.celeryconf import task_client
from cachewarden.settings import Settings
from tests.helpers import wait_for

# The task states each event type reports (Celery's own mapping, as Flower shows it).
STATES = {
    "task-sent": "PENDING",
    "task-received": "RECEIVED",
    "task-started": "STARTED",
    "task-retried": "RETRY",
    "task-failed": "FAILURE",
    "task-succeeded": "SUCCESS",
}


class TaskEvents:
    """Records every task event on the settings' broker, from `start()` on."""

    def __init__(self, settings: Settings) -> None:
        self.app: Celery = task_client(settings)
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="test-task-events", daemon=True)

    def start(self) -> TaskEvents:
        """Start listening; return once the receiver is subscribed."""
        self._thread.start()
        wait_for(self._listening.is_set, 20, what="the event receiver to subscribe")
        return self

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            receiver = self.app.events.Receiver(conn, handlers={"*": self._record})
            self._receiver = receiver
            on_ready = receiver.on_consume_ready

            def ready(*args: Any, **kwargs: Any) -> None:
                on_ready(*args, **kwargs)
                self._listening.set()

            receiver.on_consume_ready = ready
            receiver.capture(limit=None, timeout=None, wakeup=False)

    def _record(self, event: dict[str, Any]) -> None:
        if str(event.get("type", "")).startswith("task-"):
            with self._lock:
                self.events.append(event)

    def states(self, task_id: str) -> list[str]:
        """The states task `task_id` went through, in the order its events came."""
        with self._lock:
            found = [e for e in self.events if e.get("uuid") == task_id]
        return [STATES[e["type"]] for e in found if e["type"] in STATES]

    def wait_state(self, task_id: str, state: str, timeout: float = 30) -> list[str]:
        """Wait until task `task_id` has reported `state`; return its states so far."""
        return list(
            wait_for(
                lambda: state in self.states(task_id) and self.states(task_id),
                timeout,
                what=f"task {task_id} to report {state}",
            )
        )

    def stop(self) -> None:
        """Stop listening (within a second)."""
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(5)


@contextmanager
def task_events(settings: Settings) -> Iterator[TaskEvents]:
    """TaskEvents listening for the duration of the block."""
    events = TaskEvents(settings).start()
    try:
        yield events
    finally:
        events.stop()
