"""The application side installs and runs without the worker's dependencies.

A fresh virtual environment gets `pip install .` (no extras), as an application
would; its processes write, read and delete, and a worker from the `worker`
extra (this repository's .venv) flushes the writes and performs the refresh a
read asked for.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import Harness
from tests.helpers import REPO, wait_for

WORKER_ONLY = ("celery", "kombu", "billiard", "apscheduler", "tzlocal", "vine", "flower")


@pytest.fixture(scope="module")
def app_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv with only `pip install .` of this checkout's library."""
    root = tmp_path_factory.mktemp("appenv")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("cachewarden", "worker", "tasks"):  # the wheel ships all three
        shutil.copytree(REPO / package, source / package)
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return python


@pytest.fixture
def sqlite_harness(tmp_path: Path, prefix: str) -> Iterator[Harness]:
    """A harness on SQLite, whose driver every Python has (no extra needed)."""
    h = Harness(tmp_path, f"sqlite:///{tmp_path / 'app.db'}", prefix)
    yield h
    h.close()


def _installed(python: Path) -> set[str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return {p["name"].lower() for p in json.loads(out.stdout)}


def _app(python: Path, h: Harness, code: str) -> Any:
    """Run `code` in a process of the application's venv with `cache` built; return what
    it prints as JSON."""
    program = (
        "import json, sys\n"
        "from cachewarden import Cache\n"
        f"cache = Cache.from_config({str(h.config_path)!r})\n"
        f"{code}\n"
    )
    out = subprocess.run(
        [str(python), "-c", program], cwd="/", capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_pip_install_brings_no_worker_dependencies(app_python: Path) -> None:
    """`pip install .` installs redis-py, SQLAlchemy and structlog, and none of Celery, kombu, billiard, APScheduler, tzlocal or Flower."""
    installed = _installed(app_python)
    assert {"cachewarden", "redis", "sqlalchemy", "structlog"} <= installed
    assert installed.isdisjoint(WORKER_ONLY)


def test_import_loads_no_worker_module(app_python: Path) -> None:
    """`python -X importtime -c "import cachewarden"` imports no celery, kombu or apscheduler module, nor the flusher."""
    out = subprocess.run(
        [str(app_python), "-X", "importtime", "-c", "import cachewarden"],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    )
    modules = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "cachewarden.cache" in modules  # the report lists what was imported
    top = {m.split(".")[0] for m in modules}
    assert top.isdisjoint({"celery", "kombu", "apscheduler", "billiard"})
    assert not {
        m
        for m in modules
        if m.startswith(("cachewarden.writebehind.flush", "cachewarden.writebehind.sink"))
    }


def test_the_app_side_writes_reads_deletes_and_a_worker_refreshes(
    app_python: Path, sqlite_harness: Harness
) -> None:
    """From the application's venv: writes land, a delete removes its row, and a read past refresh_ahead gets a refresh that the worker performs (the entry changes without any load)."""
    h = sqlite_harness
    h.create_table("users", version=False)
    h.configure(
        {"user": {"table": "users", "key": "id", "ttl": "3s", "refresh_ahead": 0.5}},
        dispatch_interval="50ms",
    )
    h.worker(concurrency=1)
    written = _app(
        app_python,
        h,
        "cache.write('user', 1, {'name': 'v1'}); cache.write('user', 2, {'name': 'gone'})\n"
        "cache.delete('user', 2)\n"
        "print(json.dumps([cache.get('user', 1), cache.get('user', 2)]))",
    )
    assert written == [{"id": 1, "name": "v1"}, None]
    wait_for(lambda: h.rows("users") == {1: {"id": 1, "name": "v1"}}, 20, what="the flush")
    entry = h.cache.keys.entry("user", "1")
    wait_for(lambda: 0 < h.cache.redis.pttl(entry), 10, what="the flushed entry's TTL")

    with h.engine.begin() as conn:  # the row changes behind the cache
        conn.execute(sa.text("UPDATE users SET name = 'v2' WHERE id = 1"))
    wait_for(lambda: 0 < h.cache.redis.pttl(entry) < 1400, 5, what="the entry to be due")
    asked = _app(
        app_python,
        h,
        "row = cache.get('user', 1)\n"
        "print(json.dumps([row, cache.reader.stats.snapshot()['refreshes_requested']]))",
    )
    assert asked == [{"id": 1, "name": "v1"}, 1]  # served at once; the refresh was asked for
    wait_for(
        lambda: json.loads(h.cache.redis.get(entry) or "null") == {"id": 1, "name": "v2"},
        15,
        what="the worker's refresh",
    )
    counters = h.cache.redis.hgetall(h.cache.keys.read_stats("user"))
    assert int(counters.get("refreshed", 0)) >= 1 and "loads" not in counters
    assert _app(app_python, h, "print(json.dumps(cache.get('user', 1)))") == {
        "id": 1,
        "name": "v2",
    }
