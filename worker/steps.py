"""Worker bootsteps that run background loops in the worker's main process.

Every worker runs each loop; Redis claims keep the work to once per due time
across all workers, so flushes, requested refreshes and sweeps go on while any
one worker lives. The loops only claim work and send tasks; the pool processes
do the database work. Both loops share the main process's one context.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from celery import Celery, bootsteps

from cachewarden.context import Context, current
from cachewarden.readpath.refresh import REFRESH_TASK
from cachewarden.readpath.sweep import run_refresh_ahead
from cachewarden.writebehind.dispatch import FLUSH_TASK, run_dispatcher


class LoopStep(bootsteps.StartStopStep):
    """Starts a daemon thread running `loop()` with the worker, stops it with the worker."""

    requires = ("celery.worker.components:Pool",)
    thread_name: ClassVar[str] = "cachewarden-loop"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def loop(self, context: Context, app: Celery, stop: threading.Event) -> None:
        """The body of the thread; return when `stop` is set."""
        raise NotImplementedError

    def start(self, parent: Any) -> None:
        self.thread = threading.Thread(
            target=self.loop,
            args=(current(), parent.app, self.stop_event),
            name=self.thread_name,
            daemon=True,
        )
        self.thread.start()

    def stop(self, parent: Any) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


class DispatcherStep(LoopStep):
    """The flush dispatcher: one flush task per due shard."""

    thread_name = "cachewarden-dispatcher"

    def loop(self, context: Context, app: Celery, stop: threading.Event) -> None:
        def send(entity: str, shard: int) -> None:
            app.send_task(FLUSH_TASK, args=[entity, shard])

        run_dispatcher(context, send, stop)


class RefreshAheadStep(LoopStep):
    """Refresh-ahead: send the refreshes reads asked for, and sweep hot keys near expiry."""

    thread_name = "cachewarden-refresh-ahead"

    def loop(self, context: Context, app: Celery, stop: threading.Event) -> None:
        def send(entity: str, keys: list[str], horizon: int | None) -> None:
            app.send_task(REFRESH_TASK, args=[entity, keys, horizon])

        run_refresh_ahead(context, send, stop)
