"""cachewarden inside an application's own Celery app: `install(app, settings)`.

Teams that already run Celery add cachewarden's work to their own workers instead of
running a second fleet:

    from celery import Celery
    import cachewarden.celery

    app = Celery("shop", broker="redis://127.0.0.1:6379/1")
    cachewarden.celery.install(app, cachewarden.load_settings("cachewarden.toml"))

One call does three things, and changes none of the app's own defaults:
- registers cachewarden's tasks (`cachewarden.flush`, `cachewarden.refresh`, ...;
  each carries its own options: JSON, late acks, redelivery when a worker dies, no
  result) and routes them to cachewarden's queues (`[celery] queue` + `.writebehind`,
  `.readpath`, `.warming`), in front of the app's own routes;
- makes the app's workers consume those queues besides their own, and run the flush
  dispatcher, the refresh-ahead loop and the monitor as bootsteps;
- gives each pool process its own cachewarden context (no connection crosses a fork),
  built from `settings`.

The tasks are the same modules the standalone worker runs (`cachewarden.tasks`,
this repository's `tasks/`): there is one copy of each.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

import structlog
from celery import Celery, signals

from cachewarden.celeryconf import FAMILIES, ROUTES, queue_of
from cachewarden.connections import as_worker, check_redis_safety, redis_client
from cachewarden.context import current, set_current, use_settings
from cachewarden.errors import CachewardenError
from cachewarden.settings import Settings, load_settings

TASK_MODULES = tuple(f"cachewarden.tasks.{family}" for family in FAMILIES)
_log = structlog.get_logger("cachewarden.celery")
_installed: set[int] = set()  # id() of the apps installed into


def install(app: Celery, settings: Settings | None = None) -> None:
    """Add cachewarden's tasks, queues, worker loops and per-process context to `app`
    (settings: the config file's, `load_settings()`, when not given)."""
    settings = settings if settings is not None else load_settings()
    if id(app) in _installed:
        return
    _installed.add(id(app))
    use_settings(settings)
    for name in TASK_MODULES:  # shared tasks: they bind to every app, this one too
        importlib.import_module(name)
    app.conf.task_routes = _routes_first(settings, app.conf.task_routes)
    steps = importlib.import_module("cachewarden.worker.steps")
    app.steps["worker"].update({steps.DispatcherStep, steps.RefreshAheadStep, steps.MonitorStep})
    app.steps["consumer"].add(steps.ConsumerHeartbeat)
    queues = [settings.queue(family) for family in FAMILIES]

    def consume(sender: Any = None, instance: Any = None, **_: Any) -> None:
        """At the worker's start: consume cachewarden's queues besides the app's own."""
        if instance is not None and instance.app is app:
            for queue in queues:
                instance.app.amqp.queues.select_add(queue_of(queue))

    def check(sender: Any = None, **_: Any) -> None:
        """At the worker's start: the metrics' directory, and say loudly where Redis could
        lose buffered writes."""
        if getattr(sender, "app", None) is not app:
            return
        as_worker()  # this process and its pool's: the worker's Redis timeouts
        # Prefork metrics and the runtime directory, before the pool forks (MonitorStep
        # serves them when [monitoring] port is set), as the standalone worker does.
        from cachewarden.operator import exporter

        try:
            exporter.prepare(settings)
            exporter.install()
        except CachewardenError as exc:  # the app's worker runs on, without our metrics
            _log.error("metrics_unavailable", detail=str(exc))
        client = redis_client(settings.redis)
        try:
            for warning in check_redis_safety(client, settings.redis):
                _log.warning("redis_unsafe", detail=warning)
        except CachewardenError as exc:
            _log.error("redis_unsafe", detail=str(exc))
        finally:
            client.close()

    signals.celeryd_after_setup.connect(consume, weak=False)
    signals.worker_init.connect(check, weak=False)
    signals.worker_process_init.connect(_fresh_context, weak=False)


def _routes_first(settings: Settings, routes: Any) -> Any:
    """cachewarden's routes (its task names to its queues) in front of the app's own,
    which are kept as they are (a dict, a list of routers, or none)."""
    ours = {name: {"queue": settings.queue(family)} for name, family in ROUTES.items()}
    if not routes:
        return ours
    if isinstance(routes, list | tuple):
        return (ours, *routes)
    return (ours, routes)


def _fresh_context(**_: Any) -> None:
    """Each pool process builds its own context, and reflects its tables in the
    background so its first task does not wait for that."""
    set_current(None)
    threading.Thread(target=current().reflect_all, name="cachewarden-reflect", daemon=True).start()
