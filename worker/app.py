"""The Celery app: `celery -A cachewarden.worker worker` and `... flower` (or `-A worker`
from this repository's root: the same files).

Reads the config once at import (no connections); clients are built in each
process after fork. A config error stops the process with one line, status 2.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from typing import Any

import structlog
from celery import Celery, bootsteps, signals

from cachewarden.celeryconf import celery_config
from cachewarden.connections import as_worker, check_redis_safety, redis_client
from cachewarden.context import Context, current, set_current
from cachewarden.errors import CachewardenError, ConfigError
from cachewarden.logs import configure_logging
from cachewarden.settings import Settings, load_settings
from cachewarden.writebehind.shardcount import check_shards

from .steps import ConsumerHeartbeat, DispatcherStep, MonitorStep, RefreshAheadStep

# Flower listens on every interface by default; keep it on loopback unless asked.
os.environ.setdefault("FLOWER_ADDRESS", "127.0.0.1")


def _flower_has_auth(argv: list[str]) -> bool:
    """Basic auth or OAuth, from the environment or the command line."""
    if os.environ.get("FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_AUTH"):
        return True
    return any(a.startswith(("--basic-auth", "--basic_auth", "--auth")) for a in argv)


if "flower" in sys.argv[1:] and not _flower_has_auth(sys.argv):
    print(
        "cachewarden: Flower never runs without authentication: set "
        "FLOWER_BASIC_AUTH=user:password (or FLOWER_AUTH with an OAuth provider)",
        file=sys.stderr,
    )
    raise SystemExit(2)


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"cachewarden: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


settings = _settings()
# The task modules beside this package: `tasks.*` in a checkout, `cachewarden.tasks.*`
# when installed (the same files).
_ROOT = (__package__ or "").rpartition(".")[0]
TASK_MODULES = [
    f"{_ROOT}.tasks.{family}" if _ROOT else f"tasks.{family}"
    for family in ("writebehind", "readpath", "warming")
]
app = Celery("cachewarden", include=TASK_MODULES)
app.conf.update(celery_config(settings))
app.steps["worker"].add(DispatcherStep)
app.steps["worker"].add(RefreshAheadStep)
app.steps["worker"].add(MonitorStep)
app.steps["consumer"].add(ConsumerHeartbeat)


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging()


@signals.worker_init.connect
def _check_redis(**_: Any) -> None:
    """Refuse to start on a Redis that could evict the write buffer, or on shard counts
    that Redis does not record for the entities' buffers."""
    as_worker()  # this process and its pool's: the worker's Redis timeouts
    configure_logging()
    # Prefork metrics: before prometheus-client is imported and before the pool forks.
    from cachewarden.operator import exporter

    try:
        exporter.prepare(settings)  # the runtime directory: private, or refused
    except CachewardenError as exc:
        print(f"cachewarden: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    exporter.install()
    client = redis_client(settings.redis)
    context = Context(settings, client)
    try:
        for warning in check_redis_safety(client, settings.redis):
            structlog.get_logger("cachewarden.worker").warning("redis_unsafe", detail=warning)
        check_shards(context)
    except CachewardenError as exc:
        print(f"cachewarden: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        context.close()
        client.close()


@signals.worker_process_shutdown.connect
def _process_gone(pid: int | None = None, **_: Any) -> None:
    """A pool process ends: its live gauges leave the metrics (its counters stay)."""
    from cachewarden.operator.exporter import process_exited

    process_exited(pid or os.getpid())


@signals.worker_process_init.connect
def _fresh_context(**_: Any) -> None:
    """Each pool process builds its own context (no client crosses a fork).

    Its tables are reflected at once, in the background, so the process's first
    task does not pay for it (a task that needs a table meanwhile waits for that
    one reflection instead of starting another).

    The objects inherited from the parent are frozen out of the garbage
    collector's generations: a flusher allocates many short-lived objects per
    batch, and rescanning the imported modules each time costs ~15% of its CPU.
    The youngest generation is collected after 10,000 net allocations, not 700: a
    flush batch of 1,000 rows holds a few thousand objects at once, which at 700
    set off ~6 collections per batch (~0.9 us of the ~10 us of Python per row,
    timed with gc.callbacks); at 10,000 a drain of 100,000 rows triggers none, and
    real cyclic garbage is still collected.
    """
    set_current(None)
    gc.freeze()
    gc.set_threshold(10_000)
    threading.Thread(target=current().reflect_all, name="cachewarden-reflect", daemon=True).start()


__all__ = ["app", "bootsteps"]
