"""The Redis password appears in no output of any command, no worker log line, and no exception."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from cachewarden.cache import Cache
from cachewarden.errors import BackendUnavailable
from tests.conftest import Harness
from tests.helpers import wait_for
from tests.servers import PrivateRedis
from tests.test_cli import cachewarden

USER = {"table": "users", "key": "id", "ttl": "10m"}


@pytest.fixture
def guarded() -> Iterator[PrivateRedis]:
    """A private Redis that requires a password."""
    with PrivateRedis(password=f"pw-{secrets.token_hex(8)}") as server:
        yield server


def _outputs(h: Harness) -> dict[str, str]:
    assert h.config_path.exists()
    out = {}
    for args in (["check"], ["stats"], ["stats", "--json"], ["run", "--no-embedded"]):
        if args[0] == "run" and "FAILED" not in out.get("check", "FAILED"):
            continue  # `run` only speaks of Redis when it does not answer
        done = cachewarden(*args, config=h.config_path)
        out[" ".join(args)] = done.stdout + done.stderr
    return out


def test_commands_show_the_redis_url_with_the_password_masked(
    pg_harness: Harness, guarded: PrivateRedis
) -> None:
    """check, stats and run name the guarded Redis (masked) whether it is up or down, and never print its password."""
    h = pg_harness
    assert guarded.password is not None
    h.create_table("users", version=False)
    h.configure({"user": USER}, redis_url=guarded.url)
    up = _outputs(h)
    assert f"redis://:***@127.0.0.1:{guarded.port}/0 ok" in up["check"]
    guarded.stop()
    down = _outputs(h)
    assert f"redis://:***@127.0.0.1:{guarded.port}/0 FAILED" in down["check"]
    assert f":***@127.0.0.1:{guarded.port}" in down["run --no-embedded"]
    leaks = {name: text for name, text in {**up, **down}.items() if guarded.password in text}
    assert leaks == {}


def test_errors_raised_to_the_application_carry_no_password(
    pg_harness: Harness, guarded: PrivateRedis
) -> None:
    """With the guarded Redis down, write() and get() raise BackendUnavailable naming the problem but not the password."""
    h = pg_harness
    assert guarded.password is not None
    h.create_table("users", version=False)
    settings = h.configure({"user": USER}, redis_url=guarded.url)
    with Cache(settings) as cache:
        cache.write("user", 1, {"name": "a"})
        guarded.stop()
        messages = []
        for call in (lambda: cache.write("user", 2, {"name": "b"}), lambda: cache.get("user", 3)):
            with pytest.raises(BackendUnavailable) as caught:
                call()
            messages.append(str(caught.value))
    assert all("Redis" in m and guarded.password not in m for m in messages), messages


def test_the_worker_logs_no_password(pg_harness: Harness, guarded: PrivateRedis) -> None:
    """A worker whose Redis (and broker) URL carries a password flushes writes and never logs the password."""
    h = pg_harness
    assert guarded.password is not None
    h.create_table("users", version=False)
    h.configure({"user": USER}, {"user": {"max_delay": "100ms"}}, redis_url=guarded.url)
    worker = h.worker(concurrency=1)
    h.cache.write("user", 1, {"name": "a"})
    wait_for(lambda: h.count("users") == 1, 30, what="the write to land")
    worker.stop()
    log = worker.log_path.read_text()
    assert f"127.0.0.1:{guarded.port}" in log  # the worker did name its Redis
    assert guarded.password not in log
