"""The Celery settings chosen for this work, and a client that sends tasks by name.

The worker app (worker/) and the scheduler use the same settings; the library
only ever *sends* tasks by name and never imports the worker or the tasks.
"""

from __future__ import annotations

import ssl
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from cachewarden.readpath.refresh import REFRESH_TASK
from cachewarden.readpath.sweep import SWEEP_TASK
from cachewarden.settings import Settings
from cachewarden.warming.run import CHUNK_TASK, WARM_TASK
from cachewarden.writebehind.dispatch import FLUSH_TASK

# Each job family's tasks run on a queue of their own (Settings.queue).
FAMILIES = ("writebehind", "readpath", "warming")
ROUTES = {
    FLUSH_TASK: "writebehind",
    REFRESH_TASK: "readpath",
    SWEEP_TASK: "readpath",
    WARM_TASK: "warming",
    CHUNK_TASK: "warming",
}


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings: JSON only, late acks, no results, events on for Flower, and one
    queue per job family (a worker consumes them all unless told otherwise by -Q)."""
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": settings.queue("writebehind"),
        "task_queues": [queue_of(settings.queue(family)) for family in FAMILIES],
        "task_routes": {name: {"queue": settings.queue(fam)} for name, fam in ROUTES.items()},
        # A task a dead worker held is redelivered, not acknowledged and lost.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Flushes run up to seconds; one at a time per process keeps others free. (Prefetch
        # is per worker: a deployment wanting another for refreshes runs them apart.)
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": 60,
        "task_time_limit": 120,
        # Flower needs both.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_concurrency": settings.celery.concurrency or None,
        **_broker_tls(settings),
        **_broker_sentinel(settings),
    }


def _broker_sentinel(settings: Settings) -> dict[str, Any]:
    """A sentinel:// broker (kombu's Sentinel transport) asks its sentinels for the
    service's primary, and follows it after a failover."""
    if not settings.broker_url.startswith("sentinel://"):
        return {}
    options: dict[str, Any] = {"master_name": settings.broker_service}
    if settings.redis.sentinel_password:
        options["sentinel_kwargs"] = {"password": settings.redis.sentinel_password}
    return {"broker_transport_options": options}


def _broker_tls(settings: Settings) -> dict[str, Any]:
    """A rediss:// broker verifies the server against [redis] tls_ca_file (and presents
    tls_cert_file/tls_key_file), as the cache's client does."""
    if not settings.broker_url.startswith("rediss://"):
        return {}
    return {"broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_REQUIRED, **settings.redis.tls}}


def queue_of(name: str) -> Queue:
    """A queue on an exchange of its own, bound by its own name: what is routed to one
    family's queue reaches only that queue (a bare Queue(name) would take Celery's
    default exchange and routing key, and every family's queue would get every task)."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def task_client(settings: Settings) -> Celery:
    """A Celery app that only sends tasks (by name) to the configured broker."""
    app = Celery("cachewarden-client", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
