"""The worker's Prometheus exporter and its probe endpoints (worker side: prometheus-client).

Celery's prefork pool runs the tasks in child processes, so the metrics use
prometheus-client's multiprocess mode: `prepare(settings)` (the worker's main
process, before the pool forks and before prometheus-client is imported) points
`PROMETHEUS_MULTIPROC_DIR` at `<dir>/metrics-<pid>`, fresh (and makes
prometheus-client, which Celery's command line imported already, use it), removes the
directories of workers no longer running; each process writes its values there;
a pool process that exits is marked dead (its live gauges dropped, its counters
kept); a scrape adds them up. What lives in Redis (pending writes, lag, dead
letters, loads by the applications) is read at scrape time.

`serve(settings, node)` answers, on `[monitoring] address:port`:
`/metrics`, `/livez` (200 while the node's consumer and dispatcher heartbeats are
fresh, else 503) and `/readyz` (200 once it consumes its queues).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog

from cachewarden import runtime
from cachewarden.operator import heartbeat
from cachewarden.settings import Settings

log = structlog.get_logger("cachewarden.exporter")

PREFIX = "cachewarden"
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


def metrics_root(settings: Settings) -> Path:
    return Path(settings.monitoring.directory)


def prepare(settings: Settings) -> Path:
    """Point prometheus-client's multiprocess mode at a fresh directory for this worker,
    and remove those of workers whose main process is gone. Call before the pool forks
    and before any metric is created."""
    root = runtime.private_dir(metrics_root(settings), heartbeat.SETTING)
    for old in root.glob("metrics-*"):
        pid = old.name.removeprefix("metrics-")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    mine = root / f"metrics-{os.getpid()}"
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir(mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mine)
    # Celery's command line imports Flower's plugin, and with it prometheus-client,
    # before the app: choose its value class again, now that the directory is set.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Meters:
    """The worker's counters and histograms, fed by cachewarden.metrics events."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Histogram

        on: Any = REGISTRY if registry is None else registry
        self.batch_rows = Histogram(
            f"{PREFIX}_flush_batch_rows",
            "Rows per flush batch.",
            ["entity"],
            buckets=BATCH_BUCKETS,
            registry=on,
        )
        self.flush_rows = Counter(
            f"{PREFIX}_rows_flushed", "Rows flushed to the database.", ["entity"], registry=on
        )
        self.flush_seconds = Histogram(
            f"{PREFIX}_flush_seconds",
            "Duration of a flush task.",
            ["entity"],
            buckets=SECONDS_BUCKETS,
            registry=on,
        )
        self.flush_failures = Counter(
            f"{PREFIX}_flush_failures",
            "Flushes that backed off or were fenced.",
            ["entity", "status"],
            registry=on,
        )
        self.lock_busy = Counter(
            f"{PREFIX}_flush_lock_busy",
            "Flushes that found their shard's lock held.",
            ["entity"],
            registry=on,
        )
        self.refreshed = Counter(
            f"{PREFIX}_refreshed_rows", "Entries refresh-ahead reloaded.", ["entity"], registry=on
        )
        self.database_reads = Counter(
            f"{PREFIX}_reads_from_database",
            "Keys read from the database because Redis failed (on_redis_error = database).",
            ["entity"],
            registry=on,
        )
        self.database_reads_refused = Counter(
            f"{PREFIX}_reads_from_database_refused",
            "Keys whose database read found no turn within redis_error_wait.",
            ["entity"],
            registry=on,
        )
        self.warm_rows = Counter(
            f"{PREFIX}_warm_rows", "Rows warm runs read.", ["job"], registry=on
        )
        self.warm_runs = Histogram(
            f"{PREFIX}_warm_run_seconds",
            "Duration of warm runs that ended, by outcome.",
            ["job", "outcome"],
            buckets=SECONDS_BUCKETS,
            registry=on,
        )

    def __call__(self, event: str, value: float, labels: Mapping[str, str]) -> None:
        if event == "flush_batch_rows":
            self.batch_rows.labels(labels["entity"]).observe(value)
        elif event == "flush_rows":
            self.flush_rows.labels(labels["entity"]).inc(value)
        elif event == "flush_seconds":
            self.flush_seconds.labels(labels["entity"]).observe(value)
        elif event == "flush_failures":
            self.flush_failures.labels(labels["entity"], labels["status"]).inc(value)
        elif event == "flush_lock_busy":
            self.lock_busy.labels(labels["entity"]).inc(value)
        elif event == "refreshed_rows":
            self.refreshed.labels(labels["entity"]).inc(value)
        elif event == "reads_from_database":
            self.database_reads.labels(labels["entity"]).inc(value)
        elif event == "reads_from_database_refused":
            self.database_reads_refused.labels(labels["entity"]).inc(value)
        elif event == "warm_rows":
            self.warm_rows.labels(labels["job"]).inc(value)
        elif event == "warm_runs":
            self.warm_runs.labels(labels["job"], labels["outcome"]).observe(value)


def install() -> Meters:
    """Create the meters (after `prepare`) and listen to the core's events."""
    from cachewarden import metrics

    meters = Meters()
    metrics.listen(meters)
    return meters


def process_exited(pid: int) -> None:
    """A pool process ended: drop its live gauges (its counters stay in the sums)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class RedisCollector:
    """Gauges and counters read from Redis at scrape time, per entity."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Any = None

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from cachewarden.connections import redis_client
        from cachewarden.operator.observe import entity_state

        if self._client is None:
            self._client = redis_client(self.settings.redis)
        pending = GaugeMetricFamily(
            f"{PREFIX}_pending_writes", "Writes buffered, not yet flushed.", labels=["entity"]
        )
        lag = GaugeMetricFamily(
            f"{PREFIX}_lag_seconds", "Age of the oldest pending write.", labels=["entity"]
        )
        dead = GaugeMetricFamily(
            f"{PREFIX}_dead_letters", "Rows the database rejected, held.", labels=["entity"]
        )
        enqueued = CounterMetricFamily(
            f"{PREFIX}_writes_enqueued",
            "Writes and deletes buffered (all time).",
            labels=["entity"],
        )
        loads = CounterMetricFamily(
            f"{PREFIX}_loads", "Read-through loads by the applications.", labels=["entity"]
        )
        reads = CounterMetricFamily(
            f"{PREFIX}_reads",
            "Reads by the applications, by result (counted in batches).",
            labels=["entity", "result"],
        )
        waits = CounterMetricFamily(
            f"{PREFIX}_stampede_waits", "Misses that waited for another loader.", labels=["entity"]
        )
        try:
            states = entity_state(self.settings, self._client)
        except Exception as exc:  # Redis down: the scrape says so, without the gauges
            log.warning("metrics_redis_unavailable", error=str(exc))
            return
        for name, state in states.items():
            pending.add_metric([name], state.pending)
            lag.add_metric([name], state.lag_s)
            dead.add_metric([name], state.dead_letters)
            enqueued.add_metric([name], state.enqueued)
            loads.add_metric([name], state.reads.get("loads", 0))
            reads.add_metric([name, "hit"], state.reads.get("hits", 0))
            reads.add_metric([name, "miss"], state.reads.get("misses", 0))
            waits.add_metric([name], state.reads.get("waits", 0))
        yield from (pending, lag, dead, enqueued, loads, reads, waits)


def serve(settings: Settings, node: str) -> ThreadingHTTPServer | None:
    """Start the HTTP endpoint in a daemon thread (None when no port is configured)."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    mon = settings.monitoring
    if not mon.port:
        return None
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(RedisCollector(settings))
    timeout_s = mon.liveness_timeout_ms / 1000

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                self._send(200, generate_latest(registry), "text/plain; version=0.0.4")
                return
            state = heartbeat.health(mon.directory, node)
            if self.path.startswith("/livez"):
                ok = state.live(timeout_s)
                self._send(200 if ok else 503, _describe(state).encode(), "text/plain")
            elif self.path.startswith("/readyz"):
                ok = state.ready
                self._send(200 if ok else 503, _describe(state).encode(), "text/plain")
            else:
                self._send(404, b"/metrics /livez /readyz\n", "text/plain")

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    try:
        server = ThreadingHTTPServer((mon.address, mon.port), Handler)
    except OSError as exc:
        log.error("monitoring_port_unavailable", address=mon.address, port=mon.port, error=str(exc))
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="cachewarden-http", daemon=True).start()
    log.info("monitoring_listening", address=mon.address, port=mon.port, node=node)
    return server


def _describe(state: heartbeat.Health) -> str:
    ages = ", ".join(
        f"{kind} {'never' if age is None else f'{age:.1f}s ago'}"
        for kind, age in state.ages_s.items()
    )
    queues = ", ".join(state.queues) or "none yet"
    return f"{state.node}: {ages}; consuming: {queues}\n"
