"""Metrics under prefork, probes that cost no broadcast, and `cachewarden status`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import Harness
from tests.helpers import REPO, wait_for
from tests.servers import free_port

USER = {"table": "users", "key": "id", "ttl": "10m"}


def monitored(h: Harness, tmp_path: Path, **extra: Any) -> int:
    """Configure `user` with a metrics port and heartbeat dir of its own; return the port."""
    port = free_port()
    h.create_table("users", version=False)
    h.configure({"user": USER}, {"user": {"max_delay": "500ms", "shards": 2}})
    text = h.config_path.read_text()
    options = {"port": port, "dir": str(tmp_path / "mon"), **extra}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    h.config_path.write_text(text + f"\n[monitoring]\n{lines}\n")
    h.configure_from_file()
    return port


def scrape(port: int) -> dict[str, float]:
    """The exporter's samples: 'name{labels}' -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def cli(h: Harness, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cachewarden.operator.cli", "--config", str(h.config_path), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_metrics_under_prefork_show_lag_rise_and_fall_and_count_every_flushed_row(
    pg_harness: Harness, tmp_path: Path
) -> None:
    """Scraped during 3,000 writes to a prefork worker of concurrency 2: the lag gauge rises above zero and falls back to zero, and rows_flushed_total equals the rows the database received."""
    h = pg_harness
    port = monitored(h, tmp_path)
    worker = h.worker(concurrency=2)
    wait_for(lambda: _answers(port), 20, what="the metrics endpoint")
    lags: list[float] = []
    for batch in range(30):
        h.cache.write_many(
            "user", {k: {"name": "x"} for k in range(batch * 100, batch * 100 + 100)}
        )
        lags.append(scrape(port).get('cachewarden_lag_seconds{entity="user"}', 0.0))
        time.sleep(0.02)
    wait_for(lambda: h.count("users") == 3000, 30, what="every write to land")

    def settled() -> dict[str, float] | None:
        samples = scrape(port)
        flushed = samples.get('cachewarden_rows_flushed_total{entity="user"}', 0)
        lag = samples['cachewarden_lag_seconds{entity="user"}']
        return samples if flushed == 3000 and lag == 0 else None

    samples = wait_for(settled, 15, what="the counter to reach 3,000 and the lag zero")
    assert max(lags) > 0, lags
    assert samples['cachewarden_pending_writes{entity="user"}'] == 0
    assert samples['cachewarden_writes_enqueued_total{entity="user"}'] == 3000
    assert len(worker.children()) == 2  # the counts came from two pool processes' files
    assert h.count("users") == 3000


def _answers(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def _probe(h: Harness, kind: str, node: str) -> subprocess.CompletedProcess[str]:
    return cli(h, "probe", kind, "--node", node)


def test_a_stopped_worker_fails_its_liveness_probe_and_a_healthy_one_passes(
    pg_harness: Harness, tmp_path: Path
) -> None:
    """Two workers: both pass `probe live` and `probe ready`; the main process of one stopped with SIGSTOP fails `probe live` within 30 s, while the other keeps passing."""
    h = pg_harness
    monitored(h, tmp_path, liveness_timeout="5s")
    stopped = h.worker(concurrency=1)
    healthy = h.worker(concurrency=1)
    nodes = [f"{w.name}@{os.uname().nodename}" for w in (stopped, healthy)]
    for node in nodes:
        wait_for(lambda n=node: _probe(h, "ready", n).returncode == 0, 20, what=f"{node} ready")
        assert _probe(h, "live", node).returncode == 0
    assert stopped.proc is not None
    os.kill(stopped.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        wait_for(
            lambda: _probe(h, "live", nodes[0]).returncode == 1,
            30,
            interval=0.5,
            what="the stopped worker to fail its liveness probe",
        )
        assert time.monotonic() - started < 30
        failed = _probe(h, "live", nodes[0])
        assert "FAIL live" in failed.stdout and "consumer" in failed.stdout
        assert _probe(h, "live", nodes[1]).returncode == 0
    finally:
        os.kill(stopped.proc.pid, signal.SIGCONT)


def test_status_shows_pending_lag_dead_letters_jobs_and_workers(
    pg_harness: Harness, tmp_path: Path
) -> None:
    """`status --json` shows an entity's pending writes and their lag while no worker runs, then, with a worker, none pending, its last flush, and the worker as seen."""
    h = pg_harness
    monitored(h, tmp_path)
    for key in range(5):
        h.cache.write("user", key, {"name": "x"})
    time.sleep(0.3)
    before = json.loads(cli(h, "status", "--json").stdout)
    user = before["entities"]["user"]
    assert user["pending"] == 5 and user["lag_s"] >= 0.3 and user["last_flush_ms"] is None
    assert before["workers_seen_s_ago"] == {}
    worker = h.worker(concurrency=1)
    wait_for(lambda: h.count("users") == 5, 20, what="the writes to land")
    node = f"{worker.name}@{os.uname().nodename}"

    def seen() -> dict[str, Any] | None:
        data = json.loads(cli(h, "status", "--json").stdout)
        return data if node in data["workers_seen_s_ago"] else None

    after = wait_for(seen, 20, interval=0.5, what="the worker to be seen")
    user = after["entities"]["user"]
    assert user["pending"] == 0 and user["lag_s"] == 0 and user["last_flush_ms"] > 0
    assert user["writes_enqueued"] == 5
    text = cli(h, "status").stdout
    assert re.search(r"entity user: pending=0 lag=0\.0s dead_letters=0", text), text


def test_the_http_probes_answer_beside_the_metrics(pg_harness: Harness, tmp_path: Path) -> None:
    """A worker with a monitoring port answers /readyz and /livez with 200 naming the queues it consumes, and an unknown path with 404."""
    h = pg_harness
    port = monitored(h, tmp_path)
    h.worker(concurrency=1)
    wait_for(lambda: _answers(port), 20, what="the endpoint")

    def status(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    _, body = wait_for(lambda: status("/readyz")[0] == 200 and status("/readyz"), 20)
    assert f"{h.queue}.writebehind" in body and f"{h.queue}.warming" in body
    assert status("/livez")[0] == 200
    assert status("/nothing")[0] == 404


def test_status_and_metrics_count_hits_and_misses_of_the_applications(
    pg_harness: Harness, tmp_path: Path
) -> None:
    """Three hits and two misses in an application process show as hits=3 and misses=2 in `status` once its Cache closes (reads are counted in batches, not one round trip each)."""
    h = pg_harness
    monitored(h, tmp_path)
    h.cache.write("user", 1, {"name": "x"})
    for _ in range(3):
        assert (h.cache.get("user", 1) or {})["name"] == "x"
    assert h.cache.get("user", 404) is None and h.cache.get("user", 405) is None
    reads = h.context.redis.hgetall(h.context.keys.read_stats("user"))
    assert "hits" not in reads or int(reads["hits"]) < 3  # not yet: counted in batches
    h._close_clients()
    entity = json.loads(cli(h, "status", "--json").stdout)["entities"]["user"]
    assert entity["reads"]["hits"] == 3 and entity["reads"]["misses"] == 2
