"""The read path's tasks on a real worker, as Celery's events report them: a task that met a
fault ends as RETRY or FAILURE, never SUCCESS."""

from __future__ import annotations

from cachewarden.readpath.refresh import REFRESH_RETRIES, REFRESH_TASK
from cachewarden.readpath.sweep import SWEEP_TASK, sweep_window_ms
from tests.celeryevents import task_events
from tests.conftest import Harness
from tests.helpers import REDIS_URL, wait_for
from tests.readpath.test_reader import LOADER, name, set_loader, setup_users
from tests.readpath.test_refresh import longest_pttl, rename_all
from tests.servers import PrivateRedis


def test_a_refresh_whose_load_fails_retries_then_fails_or_reloads(pg_harness: Harness) -> None:
    """A refresh task whose load fails reports RETRY and, its retries spent, FAILURE; one whose database comes back during its retries reloads its keys and reports SUCCESS."""
    h = pg_harness
    setup_users(h, loader=LOADER, lock_timeout="200ms")
    h.cache.get_many("user", [1, 2])
    rename_all(h, "v2-")
    set_loader(h, broken=True)
    h.worker(concurrency=1)
    assert h.settings is not None
    with task_events(h.settings) as events:
        failed = events.app.send_task(REFRESH_TASK, args=["user", ["1"], None]).id
        states = events.wait_state(failed, "FAILURE")
        assert states.count("RETRY") == REFRESH_RETRIES and "SUCCESS" not in states
        healed = events.app.send_task(REFRESH_TASK, args=["user", ["2"], None]).id
        events.wait_state(healed, "RETRY")
        set_loader(h, broken=False)
        states = events.wait_state(healed, "SUCCESS")
        assert "RETRY" in states and "FAILURE" not in states
    assert name(h, 2) == "v2-2"  # reloaded by the retry
    assert name(h, 1) == "v1-1"  # never reloaded: the old value stays


def _broker_apart(h: Harness) -> None:
    """Keep the broker on the shared Redis while the cache uses another."""
    text = h.config_path.read_text()
    queue = f'queue = "{h.queue}"'
    h.config_path.write_text(text.replace(queue, f'{queue}\nbroker_url = "{REDIS_URL}"', 1))
    h.configure_from_file()


def test_refresh_and_sweep_tasks_report_redis_and_database_faults(pg_harness: Harness) -> None:
    """A sweep task whose reload fails reports FAILURE; with the cache's Redis down, refresh and sweep tasks report RETRY, then FAILURE; none reports SUCCESS."""
    h = pg_harness
    with PrivateRedis() as cache_redis:
        setup_users(h, loader=LOADER, ttl="3s", refresh_ahead=0.5, lock_timeout="200ms")
        spec = {
            "table": "users",
            "key": "id",
            "loader": LOADER,
            "ttl": "3s",
            "refresh_ahead": 0.5,
            "lock_timeout": "200ms",
            "sweep_interval": "1h",  # the worker's own sweep runs once, at its start
        }
        h.configure({"user": spec}, redis_url=cache_redis.url)
        _broker_apart(h)
        assert h.settings is not None and h.settings.broker_url == REDIS_URL
        h.worker(concurrency=1)
        guard = h.cache.keys.sweep_guard("user")
        wait_for(lambda: h.cache.redis.exists(guard), 30, what="the worker's own sweep")
        h.cache.get_many("user", [1, 2])  # loaded
        h.cache.get_many("user", [1, 2])  # read since: hot
        window = sweep_window_ms(h.cache.entity("user"))  # 2.85 s of the 3 s TTL
        entries = [h.cache.keys.entry("user", k) for k in ("1", "2")]
        wait_for(lambda: longest_pttl(h, entries) < window - 50, 5, what="the sweep window")
        set_loader(h, broken=True)
        with task_events(h.settings) as events:
            swept = events.app.send_task(SWEEP_TASK, args=["user"]).id
            assert events.wait_state(swept, "FAILURE")[-1] == "FAILURE"
            assert "SUCCESS" not in events.states(swept)
            assert h.cache.redis.exists(h.cache.keys.refresh_queued("user", "1"))  # it claimed
            cache_redis.stop()
            refreshed = events.app.send_task(REFRESH_TASK, args=["user", ["1"], None]).id
            swept = events.app.send_task(SWEEP_TASK, args=["user"]).id
            for task in (refreshed, swept):
                states = events.wait_state(task, "FAILURE")
                assert states.count("RETRY") == REFRESH_RETRIES and "SUCCESS" not in states
