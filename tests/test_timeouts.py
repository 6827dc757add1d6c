"""A Redis that accepts connections and never answers costs an application about a
second per call, not thirty (issue 20: timeouts a user can set)."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachewarden import Cache
from cachewarden.connections import redis_client
from cachewarden.errors import BackendUnavailable, CachewardenError
from cachewarden.settings import load_settings
from tests.helpers import render_config


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in held:
        conn.close()


def _config(tmp_path: Path, port: int, redis: dict[str, str] | None = None) -> Path:
    path = tmp_path / "cachewarden.toml"
    path.write_text(
        render_config(
            {
                "redis": {"url": f"redis://127.0.0.1:{port}/0", **(redis or {})},
                "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
                "entities.user": {"table": "users", "key": "id", "ttl": "1m"},
            }
        )
    )
    return path


def test_get_and_write_against_a_silent_redis_raise_within_the_socket_timeout(
    tmp_path: Path, silent_port: int
) -> None:
    """Against a Redis that accepts connections and never answers, Cache.from_config() returns or raises within a few seconds, and get() and write() raise BackendUnavailable within about the default 1 s socket timeout."""
    config = _config(tmp_path, silent_port)
    with sqlite3.connect(tmp_path / "db.sqlite") as db:  # a table to reflect, as an app has
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    started = time.monotonic()
    try:
        cache = Cache.from_config(config)
    except CachewardenError:
        cache = None
    assert time.monotonic() - started < 5
    if cache is None:  # it refused at once: the calls are not to be had either way
        return
    try:
        for call in (lambda: cache.get("user", 1), lambda: cache.write("user", 1, {"name": "x"})):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                call()
            assert 0.8 < time.monotonic() - started < 2.5
    finally:
        cache.close()


def test_the_timeouts_are_settings_apart_for_applications_and_workers(
    tmp_path: Path, silent_port: int
) -> None:
    """`[redis] socket_timeout` bounds an application's wait (here 300 ms) and `worker_socket_timeout` a worker process's (here 1.5 s), on the same config."""
    settings = load_settings(
        _config(
            tmp_path, silent_port, {"socket_timeout": "300ms", "worker_socket_timeout": "1500ms"}
        )
    )
    for worker, low, high in ((False, 0.25, 1.0), (True, 1.4, 3.0)):
        client = redis_client(settings.redis, worker=worker)
        started = time.monotonic()
        with pytest.raises(Exception, match="Timeout"):
            client.get("x")
        assert low < time.monotonic() - started < high
        client.close()
