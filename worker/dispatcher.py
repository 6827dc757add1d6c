"""A worker bootstep that runs the flush dispatcher in the worker's main process.

Every worker dispatches; the due-set claim keeps it to one task per due time,
so the flush deadline holds while any one worker is alive.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import bootsteps

from cachewarden.dispatch import FLUSH_TASK, run_dispatcher
from cachewarden.runtime import Runtime
from cachewarden.settings import load_settings


class DispatcherStep(bootsteps.StartStopStep):
    """Starts and stops the dispatcher thread with the worker."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        runtime = Runtime.build(load_settings())
        app = parent.app

        def send(entity: str, shard: int) -> None:
            app.send_task(FLUSH_TASK, args=[entity, shard])

        self.thread = threading.Thread(
            target=run_dispatcher,
            args=(runtime, send, self.stop_event),
            name="cachewarden-dispatcher",
            daemon=True,
        )
        self.thread.start()

    def stop(self, parent: Any) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
