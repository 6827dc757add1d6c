"""One context per process: tables reflected once, shared by the Cache and the worker side."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis

from cachewarden import context as context_module
from cachewarden.cache import Cache
from cachewarden.readpath.sqlload import loader_for
from cachewarden.tables import EntityTable
from cachewarden.writebehind.flush import sink_for
from tests.conftest import Harness


def _setup(h: Harness) -> None:
    h.create_table("users", version=False)
    h.configure({"user": {"table": "users", "key": "id", "ttl": "10m"}})


def _count_reflections(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record each reflection the context module makes (the real one still runs)."""
    calls: list[str] = []
    real = context_module.reflect_table

    def counting(*args: Any) -> EntityTable:
        calls.append(args[1].name)
        return real(*args)

    monkeypatch.setattr(context_module, "reflect_table", counting)
    return calls


def test_a_table_is_reflected_once_however_many_threads_miss_at_once(
    pg_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty threads asking a fresh context for the same table at once get one reflected table, reflected once."""
    h = pg_harness
    _setup(h)
    calls = _count_reflections(monkeypatch)
    assert h.settings is not None
    with Cache(h.settings, reflect=False) as cache:
        start = threading.Barrier(20)
        seen: list[EntityTable] = []

        def ask() -> None:
            start.wait()
            seen.append(cache.context.table("user"))

        threads = [threading.Thread(target=ask) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(seen) == 20 and all(t is seen[0] for t in seen)
    assert calls == ["user"]


def test_the_loader_and_the_sink_share_the_one_reflection(
    pg_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Cache reflects its tables at construction; its first miss and a flush on the same context reflect nothing more."""
    h = pg_harness
    _setup(h)
    calls = _count_reflections(monkeypatch)
    assert h.settings is not None
    with Cache(h.settings) as cache:
        assert calls == ["user"]  # at construction
        assert cache.get("user", 404) is None  # a miss: loads, no reflection
        assert (
            sink_for(cache.context, "user").reflected is loader_for(cache.context, "user").reflected
        )
        assert calls == ["user"]


def _connected(admin: redis.Redis, client_id: int) -> bool:
    return bool(admin.execute_command("CLIENT", "LIST", "ID", client_id))


def test_a_cache_closes_its_own_context_and_leaves_a_shared_one_open(
    pg_harness: Harness, redis_admin: redis.Redis
) -> None:
    """Leaving `with Cache(settings)` closes its Redis connections; a Cache handed a shared context leaves that context's open."""
    h = pg_harness
    _setup(h)
    assert h.settings is not None
    shared = h.context
    shared_id = shared.redis.client_id()
    with Cache(context=shared) as cache:
        cache.write("user", 1, {"name": "a"})
    assert _connected(redis_admin, shared_id)
    with Cache(h.settings) as own:
        own.write("user", 2, {"name": "b"})
        own_id = own.redis.client_id()
        assert _connected(redis_admin, own_id)
    assert not _connected(redis_admin, own_id)
