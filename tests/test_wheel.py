"""The product as a user installs it: a wheel built from this checkout, installed with
its `worker` and `postgresql` extras in a fresh virtual environment, run from a
directory outside the checkout.

`cachewarden worker`, `cachewarden scheduler` and `cachewarden flower` start there; a
write reaches PostgreSQL through that worker and a warming job fires. A dependency
missing from the extras fails here (the development environment has more installed).
Marked `install` (it downloads the extras' packages): `.ci/run` runs it after
`make test`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import Harness
from tests.helpers import REPO, wait_for
from tests.servers import free_port

pytestmark = [pytest.mark.install, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` builds from this checkout (in pip's isolated build env)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("cachewarden-*.whl")
    return built


@pytest.fixture(scope="module")
def user_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a fresh venv with `pip install 'cachewarden[worker,postgresql]'`
    from the wheel, as a user would install it."""
    root = tmp_path_factory.mktemp("userenv")
    venv.create(root / "venv", with_pip=True)
    pip = [str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(
        [*pip, "--disable-pip-version-check", f"{wheel}[worker,postgresql]"],
        check=True,
        capture_output=True,
        timeout=900,
    )
    return root / "venv" / "bin"


def test_the_wheel_holds_every_package_and_script_of_the_tree(wheel: Path) -> None:
    """The wheel holds each package of the source tree (the library, `worker/` as cachewarden.worker, `tasks/` as cachewarden.tasks), every Lua script and py.typed, and no top-level worker, tasks or config."""
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"cachewarden/{p.relative_to(REPO / 'cachewarden')}"
        for p in (REPO / "cachewarden").rglob("*.py")
    }
    expected |= {f"cachewarden/worker/{p.name}" for p in (REPO / "worker").glob("*.py")}
    expected |= {f"cachewarden/tasks/{p.name}" for p in (REPO / "tasks").glob("*.py")}
    expected |= {
        f"cachewarden/scripts/{p.name}" for p in (REPO / "cachewarden/scripts").glob("*.lua")
    }
    expected.add("cachewarden/py.typed")
    assert expected - names == set()
    assert not {n for n in names if n.split("/")[0] in ("worker", "tasks", "config")}


class _Process:
    """A process of the user's venv, run from its own directory, its output in a file."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._file = open(log, "wb")
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=self._file, stderr=subprocess.STDOUT
        )

    def said(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._file.close()


@pytest.fixture
def processes() -> Iterator[list[_Process]]:
    procs: list[_Process] = []
    yield procs
    for proc in procs:
        proc.stop()


def test_worker_scheduler_and_flower_run_from_a_pip_install_outside_the_checkout(
    user_env: Path, pg_harness: Harness, tmp_path: Path, processes: list[_Process]
) -> None:
    """From the user's venv, in a directory outside the checkout, `cachewarden worker`, `scheduler` and `flower` start; a write reaches PostgreSQL through that worker, and a warming job's run fills a row the cache had never seen."""
    h = pg_harness
    h.create_table("users", version=False)
    h.configure(
        {"user": {"table": "users", "key": "id", "ttl": "10m"}},
        warming={"users": {"entity": "user", "every": "2s", "query": "SELECT id, name FROM users"}},
    )
    home = tmp_path / "deploy"
    home.mkdir()
    assert not str(home).startswith(str(REPO))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    port = free_port()
    env |= {
        "CACHEWARDEN_CONFIG": str(h.config_path),
        "FLOWER_BASIC_AUTH": "ops:secret",
        "PATH": f"{user_env}:{env.get('PATH', '')}",
    }
    cli = str(user_env / "cachewarden")
    worker = _Process([cli, "worker", "-c", "1"], home, env, tmp_path / "worker.log")
    processes.append(worker)
    scheduler = _Process([cli, "scheduler"], home, env, tmp_path / "scheduler.log")
    processes.append(scheduler)
    flower = _Process([cli, "flower", f"--port={port}"], home, env, tmp_path / "flower.log")
    processes.append(flower)

    wait_for(lambda: " ready." in worker.said() or not worker.alive(), 120, what="the worker")
    assert worker.alive(), worker.said()[-3000:]

    h.cache.write("user", 1, {"name": "from-the-app"})
    wait_for(
        lambda: h.rows("users") == {1: {"id": 1, "name": "from-the-app"}}, 60, what="the flush"
    )

    with h.engine.begin() as conn:  # a row the cache never saw
        conn.execute(sa.text("INSERT INTO users (id, name) VALUES (2, 'warmed')"))
    entry = h.cache.keys.entry("user", "2")
    wait_for(lambda: h.cache.redis.get(entry) is not None, 60, what="a warming run to fill it")
    assert scheduler.alive(), scheduler.said()[-3000:]

    def flower_answers() -> bool:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/healthcheck")
        try:
            with urllib.request.urlopen(request, timeout=2) as reply:
                return bool(reply.status == 200)
        except urllib.error.HTTPError:
            return True  # it answers (what it says is Flower's business)
        except OSError:
            return not flower.alive()

    wait_for(flower_answers, 60, what="Flower to answer")
    assert flower.alive(), flower.said()[-3000:]
    for proc in (worker, scheduler, flower):
        assert "ModuleNotFoundError" not in proc.said()
