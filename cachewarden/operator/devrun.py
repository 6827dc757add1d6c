"""`cachewarden run`: the whole thing on one machine, for trying it out, with a live demo.

It uses the configured Redis when it answers, and otherwise starts an embedded one
(`embedded`, beside it); it creates the demo tables, starts a worker, a scheduler
and Flower (with credentials made once and kept), then shows, live: writes
reaching the database, a refresh reloading a row the database changed behind
the cache, and a warm run. Its state (the embedded Redis's AOF, Flower's
credentials, the processes' logs) lives in one runtime directory, `.cachewarden`
(or `$CACHEWARDEN_RUNTIME_DIR`), which a second run reuses: mode 0700 and this
user's (a run refuses one that is not). Ctrl-C stops it all.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from cachewarden import runtime
from cachewarden.settings import CONFIG_ENV, Settings, config_path

RUNTIME_ENV = "CACHEWARDEN_RUNTIME_DIR"
FLOWER_USER = "cachewarden"


def runtime_dir() -> Path:
    """The run's state directory, private to this user (UnsafePath when it is not)."""
    return runtime.private_dir(os.environ.get(RUNTIME_ENV) or ".cachewarden", f"${RUNTIME_ENV}")


def flower_credentials(directory: Path) -> str:
    """user:password for Flower, made on the first run and kept: created 0600 (never
    through a symbolic link), and refused (UnsafePath) if another user could read it."""
    path = directory / "flower-credentials"
    text = f"{FLOWER_USER}:{secrets.token_urlsafe(12)}"
    if runtime.create_secret(path, text + "\n"):
        return text
    return runtime.read_secret(path).strip()


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """The child processes of a run: started with our config, stopped together."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.logs = directory / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Path:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *argv],
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.children.append((name, proc))
        return log

    def stop(self) -> None:
        for _, proc in self.children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.children:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def exited(self) -> str | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return name
        return None


def _wait(predicate: Callable[[], Any], timeout_s: float, what: str, procs: Processes) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        gone = procs.exited()
        if gone:
            raise RuntimeError(f"the {gone} exited (see {procs.logs / gone}.log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


def run(settings: Settings, config: str | None, no_embedded: bool, demo: bool, out: TextIO) -> int:
    """Bring everything up, run the demo, then wait for Ctrl-C or SIGTERM."""
    from cachewarden.operator.embedded import redis_answers, start_embedded_redis

    directory = runtime_dir()
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    embedded = None
    if not redis_answers(settings.redis.url):
        if no_embedded:
            print(f"cachewarden: Redis at {settings.redis.shown} does not answer", file=sys.stderr)
            return 1
        embedded = start_embedded_redis(settings.redis.url, directory / "redis")
        say(out, f"started an embedded Redis at {settings.redis.shown} (AOF in {directory}/redis)")
    else:
        say(out, f"using the Redis at {settings.redis.shown}")
    env = {**os.environ, CONFIG_ENV: str(config_path(config).resolve())}
    procs = Processes(directory, env)
    try:
        _create_tables(settings)
        credentials = flower_credentials(directory)
        port = _free_port(5555)
        worker_log = procs.start(
            "worker", ["-m", "celery", "-A", "cachewarden.worker", "worker", "--loglevel", "INFO"]
        )
        procs.start("scheduler", ["-m", "cachewarden.operator.cli", "scheduler"])
        procs.start(
            "flower",
            ["-m", "celery", "-A", "cachewarden.worker", "flower", f"--port={port}"],
            {"FLOWER_BASIC_AUTH": credentials},
        )
        _wait(lambda: b" ready." in worker_log.read_bytes(), 90, "the worker", procs)
        say(out, f"worker, scheduler and Flower running (logs in {procs.logs})")
        if demo:
            Demo(settings, out, procs).run()
        user, _, password = credentials.partition(":")
        say(out, f"Flower: http://127.0.0.1:{port}  (user {user}, password {password})")
        say(out, "running; Ctrl-C stops everything")
        while not stop.wait(0.5):
            gone = procs.exited()
            if gone:
                say(out, f"the {gone} exited; stopping (see {procs.logs / gone}.log)")
                return 1
        return 0
    finally:
        procs.stop()
        if embedded is not None:
            embedded.terminate()
            embedded.wait(10)


def say(out: TextIO, text: str) -> None:
    out.write(f"cachewarden: {text}\n")
    out.flush()


def _create_tables(settings: Settings) -> None:
    import argparse

    from cachewarden.operator.commands import demo

    with open(os.devnull, "w") as quiet:
        saved, sys.stdout = sys.stdout, quiet
        try:
            demo(settings, argparse.Namespace())
        finally:
            sys.stdout = saved


class Demo:
    """A write reaching the database, a refresh, a warm run: each shown as it happens."""

    def __init__(self, settings: Settings, out: TextIO, procs: Processes) -> None:
        self.settings = settings
        self.out = out
        self.procs = procs

    def run(self) -> None:
        from cachewarden.cache import Cache

        if "user" not in self.settings.entities:
            say(self.out, "demo: the config has no `user` entity; skipped")
            return
        cache = Cache(self.settings)
        try:
            self._writes(cache)
            self._refresh(cache)
            self._warm()
        finally:
            cache.close()

    def _rows(self, where: str = "") -> list[Any]:
        from sqlalchemy import text

        spec = self.settings.entity("user")
        engine = self._engine()
        with engine.connect() as conn:
            return list(conn.execute(text(f"SELECT * FROM {spec.table} {where}")))

    def _engine(self) -> Any:
        from cachewarden.database import make_engine

        if not hasattr(self, "engine"):
            self.engine = make_engine(self.settings.database)
        return self.engine

    def _writes(self, cache: Any) -> None:
        version = int(time.time() * 1000)
        row = {"id": 1, "name": "Ada", "email": "ada@example.com", "version": version}
        started = time.monotonic()
        cache.write("user", 1, row)
        say(self.out, "demo: cache.write('user', 1, {'name': 'Ada', ...}): one Redis round trip")
        spec = self.settings.entity("user")
        where = f"WHERE {spec.key_columns[0]} = 1 AND name = 'Ada'"
        found = _wait(lambda: self._rows(where), 30, "the write to land", self.procs)
        took = time.monotonic() - started
        say(self.out, f"demo: ...and in the database {took:.2f}s later: {tuple(found[0])}")
        rows = {k: {"id": k, "name": f"user {k}", "version": version} for k in range(2, 1002)}
        started = time.monotonic()
        cache.write_many("user", rows)
        _wait(lambda: len(self._rows()) >= 1001, 60, "1,000 more writes to land", self.procs)
        took = time.monotonic() - started
        say(self.out, f"demo: cache.write_many() of 1,000 rows: in the database after {took:.2f}s")

    def _refresh(self, cache: Any) -> None:
        from sqlalchemy import text

        from cachewarden.celeryconf import task_client
        from cachewarden.readpath.refresh import REFRESH_TASK

        spec = self.settings.entity("user")
        with self._engine().begin() as conn:
            conn.execute(
                text(f"UPDATE {spec.table} SET name = 'Ada L.' WHERE {spec.key_columns[0]} = 1")
            )
        name = (cache.get("user", 1) or {}).get("name")
        say(self.out, f"demo: a program renames user 1 in the database; the cache says {name!r}")
        task_client(self.settings).send_task(REFRESH_TASK, args=["user", ["1"], None])

        def reloaded() -> bool:
            return (cache.get("user", 1) or {}).get("name") == "Ada L."

        _wait(reloaded, 30, "the refresh", self.procs)
        say(
            self.out,
            "demo: a refresh (what refresh-ahead sends before a hot key expires) "
            "reloaded it: 'Ada L.'",
        )

    def _warm(self) -> None:
        import argparse
        import io

        from cachewarden.operator.warm import warm

        if not self.settings.warming:
            say(self.out, "demo: the config has no warming job; skipped")
            return
        job = next(iter(self.settings.warming))
        err = io.StringIO()
        saved, sys.stderr = sys.stderr, err
        try:
            args = argparse.Namespace(job=job, inline=False, timeout=120.0)
            code = warm(self.settings, args)
        finally:
            sys.stderr = saved
        last = (err.getvalue().strip().splitlines() or ["no output"])[-1]
        say(self.out, f"demo: cachewarden warm {job}: {last}" + ("" if code == 0 else " (FAILED)"))
