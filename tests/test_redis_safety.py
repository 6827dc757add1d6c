"""Refusing to run where Redis could evict or forget the write buffer."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import Harness
from tests.helpers import REPO, render_config, wait_for
from tests.servers import PrivateRedis

USER = {"table": "users", "key": "id", "ttl": "1m"}


@pytest.fixture
def evicting_redis() -> Iterator[PrivateRedis]:
    """A private Redis whose maxmemory-policy (allkeys-lru) may evict any key."""
    server = PrivateRedis().start()
    client = redis.Redis.from_url(server.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.close()
    yield server
    server.close()


def _config(h: Harness, server: PrivateRedis, policy: str | None = None) -> Path:
    redis_table = {"url": server.url, "prefix": h.prefix}
    if policy:
        redis_table["unsafe_policy"] = policy
    h.config_path.write_text(
        render_config(
            {
                "redis": redis_table,
                "database": {"url": h.db_url},
                "celery": {"queue": h.queue},
                "entities.user": USER,
            }
        )
    )
    return h.config_path


def test_worker_refuses_an_evicting_redis(
    pg_harness: Harness, evicting_redis: PrivateRedis
) -> None:
    """A worker exits with status 2 and says why when Redis could evict the write buffer."""
    _config(pg_harness, evicting_redis)
    worker = pg_harness.worker(start=False)
    worker.start(wait=False)
    wait_for(lambda: worker.exited, 60, what="the worker to give up")
    assert worker.proc is not None and worker.proc.returncode == 2
    assert "allkeys-lru" in worker.output() and "noeviction" in worker.output()


def test_unsafe_policy_warn_lets_the_worker_run(
    pg_harness: Harness, evicting_redis: PrivateRedis
) -> None:
    """With unsafe_policy = "warn" the worker starts, and says what is unsafe."""
    pg_harness.create_table("users", version=False)
    _config(pg_harness, evicting_redis, policy="warn")
    worker = pg_harness.worker()
    assert not worker.exited
    assert "allkeys-lru" in worker.output()


def test_check_reports_the_eviction_policy(
    pg_harness: Harness, evicting_redis: PrivateRedis
) -> None:
    """`cachewarden check` fails and names the policy to set."""
    pg_harness.create_table("users", version=False)
    config = _config(pg_harness, evicting_redis)
    result = subprocess.run(
        [sys.executable, "-m", "cachewarden.operator.cli", "--config", str(config), "check"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 1
    assert "allkeys-lru" in result.stdout and "noeviction" in result.stdout
