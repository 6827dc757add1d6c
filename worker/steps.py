"""Worker bootsteps that run background loops in the worker's main process.

Every worker runs each loop; Redis claims keep the work to once per due time
across all workers, so flushes and sweeps go on while any one worker lives.
The loops only claim work and send tasks; the pool processes do the database work.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from celery import Celery, bootsteps

from cachewarden.dispatch import FLUSH_TASK, run_dispatcher
from cachewarden.refresh import REFRESH_TASK, run_sweeper
from cachewarden.runtime import Runtime
from cachewarden.settings import load_settings


class LoopStep(bootsteps.StartStopStep):
    """Starts a daemon thread running `loop()` with the worker, stops it with the worker."""

    requires = ("celery.worker.components:Pool",)
    thread_name: ClassVar[str] = "cachewarden-loop"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def loop(self, runtime: Runtime, app: Celery, stop: threading.Event) -> None:
        """The body of the thread; return when `stop` is set."""
        raise NotImplementedError

    def start(self, parent: Any) -> None:
        runtime = Runtime.build(load_settings())
        self.thread = threading.Thread(
            target=self.loop,
            args=(runtime, parent.app, self.stop_event),
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

    def loop(self, runtime: Runtime, app: Celery, stop: threading.Event) -> None:
        def send(entity: str, shard: int) -> None:
            app.send_task(FLUSH_TASK, args=[entity, shard])

        run_dispatcher(runtime, send, stop)


class SweeperStep(LoopStep):
    """The hot-key sweeper: reload batches of hot keys before they expire."""

    thread_name = "cachewarden-sweeper"

    def loop(self, runtime: Runtime, app: Celery, stop: threading.Event) -> None:
        def send(entity: str, keys: list[str], horizon: int | None, at: int | None) -> None:
            app.send_task(REFRESH_TASK, args=[entity, keys, horizon, at])

        run_sweeper(runtime, send, stop)
