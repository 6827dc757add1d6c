"""A worker bootstep that runs the hot-key sweeper in the worker's main process.

Every worker runs one; a Redis guard per entity admits one sweep per sweep
period across all of them, so hot keys are reloaded while any worker is alive.
The sweeper only claims keys (a Lua script) and sends "cachewarden.refresh"
tasks; the pool processes do the database work.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import bootsteps

from cachewarden.refresh import REFRESH_TASK, run_sweeper
from cachewarden.runtime import Runtime
from cachewarden.settings import load_settings


class SweeperStep(bootsteps.StartStopStep):
    """Starts and stops the sweeper thread with the worker."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        runtime = Runtime.build(load_settings())
        app = parent.app

        def send(entity: str, keys: list[str], horizon: int | None, at: int | None) -> None:
            app.send_task(REFRESH_TASK, args=[entity, keys, horizon, at])

        self.thread = threading.Thread(
            target=run_sweeper,
            args=(runtime, send, self.stop_event),
            name="cachewarden-sweeper",
            daemon=True,
        )
        self.thread.start()

    def stop(self, parent: Any) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
