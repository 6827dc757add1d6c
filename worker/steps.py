"""Worker bootsteps that run background loops in the worker's main process.

Every worker runs each loop; Redis claims keep the work to once per due time
across all workers, so flushes, requested refreshes and sweeps go on while any
one worker lives. The loops only claim work and send tasks; the pool processes
do the database work. Both loops share the main process's one context.
"""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

from celery import Celery, bootsteps

from cachewarden.context import Context, current
from cachewarden.operator import heartbeat
from cachewarden.readpath.refresh import REFRESH_TASK
from cachewarden.readpath.sweep import run_refresh_ahead
from cachewarden.writebehind.dispatch import FLUSH_TASK, run_dispatcher

# How often a worker refreshes its entry in Redis's list of workers seen.
SEEN_EVERY_S = 5.0


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
    """The flush dispatcher: one flush task per due shard. Each pass beats the node's
    dispatcher heartbeat (a file, for the liveness probe) and, every few seconds, its
    entry in Redis's list of workers seen (for `cachewarden status`)."""

    thread_name = "cachewarden-dispatcher"

    def start(self, parent: Any) -> None:
        self.node = str(parent.hostname)
        super().start(parent)

    def loop(self, context: Context, app: Celery, stop: threading.Event) -> None:
        directory = context.settings.monitoring.directory
        seen_at = [0.0]

        def send(entity: str, shard: int) -> None:
            app.send_task(FLUSH_TASK, args=[entity, shard])

        def beat() -> None:
            heartbeat.beat(directory, self.node, "dispatcher")
            now = time.time()
            if now - seen_at[0] >= SEEN_EVERY_S:
                seen_at[0] = now
                context.redis.zadd(context.keys.workers(), {self.node: int(now * 1000)})

        run_dispatcher(context, send, stop, beat)


class RefreshAheadStep(LoopStep):
    """Refresh-ahead: send the refreshes reads asked for, and sweep hot keys near expiry."""

    thread_name = "cachewarden-refresh-ahead"

    def loop(self, context: Context, app: Celery, stop: threading.Event) -> None:
        def send(entity: str, keys: list[str], horizon: int | None) -> None:
            app.send_task(REFRESH_TASK, args=[entity, keys, horizon])

        run_refresh_ahead(context, send, stop)


class ConsumerHeartbeat(bootsteps.StartStopStep):
    """A consumer step: beats the node's consumer heartbeat from the consumer's own event
    loop every second (a stuck loop stops it), and marks the node ready once it consumes
    its queues."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer: Any = None

    def start(self, parent: Any) -> None:
        directory = current().settings.monitoring.directory
        node = str(parent.hostname)
        heartbeat.beat(directory, node, "consumer")
        self.timer = parent.timer.call_repeatedly(
            1.0, heartbeat.beat, (directory, node, "consumer")
        )
        queues = sorted(q.name for q in parent.task_consumer.queues)
        heartbeat.mark_ready(directory, node, queues)

    def stop(self, parent: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
        heartbeat.clear(current().settings.monitoring.directory, str(parent.hostname))


class MonitorStep(bootsteps.StartStopStep):
    """The HTTP endpoint beside the worker: /metrics, /livez, /readyz ([monitoring] port)."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.server: Any = None

    def start(self, parent: Any) -> None:
        from cachewarden.operator.exporter import serve

        self.server = serve(current().settings, str(parent.hostname))

    def stop(self, parent: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
