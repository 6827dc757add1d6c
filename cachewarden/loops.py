"""The loop the worker's background threads (flush dispatcher, refresh-ahead) run in."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog
from redis.exceptions import RedisError

from cachewarden.errors import CachewardenError

log = structlog.get_logger("cachewarden.loops")


def run_every(tick_s: float, body: Callable[[], object], stop: threading.Event, name: str) -> None:
    """Call `body` every `tick_s` seconds until `stop` is set.

    A failure (Redis down, a broker outage in a send, a bad config) is logged as
    `<name>_failed` and the loop waits up to 20 ticks (at most 5 s) before the
    next try: the thread outlives every outage.
    """
    pause = min(5.0, tick_s * 20)
    while not stop.is_set():
        try:
            body()
        except RedisError as exc:
            log.warning(f"{name}_failed", error=str(exc))
            stop.wait(pause)
        except CachewardenError as exc:
            log.error(f"{name}_failed", error=str(exc))
            stop.wait(pause)
        except Exception as exc:  # a broker outage in a send; keep the loop alive
            log.exception(f"{name}_failed", error=str(exc))
            stop.wait(pause)
        stop.wait(tick_s)
