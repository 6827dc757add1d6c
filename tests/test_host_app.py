"""cachewarden inside an application's own Celery app (`cachewarden.celery.install`).

The application lives in a temporary directory with its own `hostapp.py` (its Celery
app) and its own top-level `tasks.py`, the name this repository's task package has
too. A worker of that app, started there, flushes cachewarden's writes, performs the
refreshes reads ask for, and runs the application's own task beside them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import sqlalchemy as sa
from celery import Celery

from tests.conftest import Harness
from tests.helpers import WorkerProcess, unique, wait_for

HOSTAPP = """
import os

from celery import Celery

import cachewarden.celery
from cachewarden.settings import load_settings

settings = load_settings(os.environ["SHOP_CACHEWARDEN"])
app = Celery("shop", broker=settings.broker_url, include=["tasks"])
app.conf.task_default_queue = os.environ["SHOP_QUEUE"]
cachewarden.celery.install(app, settings)
"""

TASKS = """
import os

import redis

from hostapp import app


@app.task(name="shop.remember")
def remember(key, value):
    redis.Redis.from_url(os.environ["SHOP_REDIS"]).set(key, value)
"""

DEFAULTS = """
import json
from hostapp import app
c = app.conf
print(json.dumps([c.task_acks_late, c.worker_prefetch_multiplier, c.task_default_queue,
                  c.task_send_sent_event, c.worker_send_task_events, c.task_ignore_result]))
"""


def _shop(tmp_path: Path) -> Path:
    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / "hostapp.py").write_text(textwrap.dedent(HOSTAPP))
    (shop / "tasks.py").write_text(textwrap.dedent(TASKS))
    return shop


def test_an_apps_own_celery_worker_flushes_refreshes_and_runs_its_own_task(
    pg_harness: Harness, tmp_path: Path
) -> None:
    """A separate Celery app with its own tasks.py that installs cachewarden keeps its own defaults, and its worker flushes writes, performs a refresh a read asked for, and runs the app's own task."""
    h = pg_harness
    h.create_table("users", version=False)
    h.configure({"user": {"table": "users", "key": "id", "ttl": "3s", "refresh_ahead": 0.5}})
    shop = _shop(tmp_path)
    queue, marker = unique("shop"), f"{h.prefix}:shop-marker"
    env = {
        "SHOP_CACHEWARDEN": str(h.config_path),
        "SHOP_QUEUE": queue,
        "SHOP_REDIS": h.settings.redis.url if h.settings else "",
        "PYTHONPATH": str(shop),
    }
    defaults = subprocess.run(
        [sys.executable, "-c", DEFAULTS],
        cwd=shop,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert defaults.returncode == 0, defaults.stderr
    # Celery's own defaults: no late acks, prefetch 4, the app's queue, no sent events.
    assert json.loads(defaults.stdout) == [False, 4, queue, False, False, False]

    worker = WorkerProcess(
        h.config_path, tmp_path / "shop-worker.log", concurrency=2, env=env, app="hostapp", cwd=shop
    )
    h.workers.append(worker)
    worker.start()

    h.cache.write("user", 1, {"name": "v1"})
    wait_for(lambda: h.rows("users") == {1: {"id": 1, "name": "v1"}}, 30, what="the flush")

    assert h.settings is not None
    client = Celery("shop-client", broker=h.settings.broker_url, set_as_current=False)
    client.send_task("shop.remember", args=[marker, "done"], queue=queue)
    wait_for(lambda: h.cache.redis.get(marker) == "done", 30, what="the app's own task")

    entry = h.cache.keys.entry("user", "1")
    wait_for(lambda: 0 < h.cache.redis.pttl(entry), 10, what="the flushed entry's TTL")
    with h.engine.begin() as conn:  # the row changes behind the cache
        conn.execute(sa.text("UPDATE users SET name = 'v2' WHERE id = 1"))
    wait_for(lambda: 0 < h.cache.redis.pttl(entry) < 1400, 5, what="the entry to be due")
    assert h.cache.get("user", 1) == {"id": 1, "name": "v1"}  # served; a refresh is asked
    wait_for(
        lambda: json.loads(h.cache.redis.get(entry) or "null") == {"id": 1, "name": "v2"},
        20,
        what="the refresh by the app's worker",
    )
    assert int(h.cache.redis.hget(h.cache.keys.read_stats("user"), "refreshed") or 0) >= 1
    client.close()
