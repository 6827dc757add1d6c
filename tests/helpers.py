"""Shared test machinery: configs, fresh databases, a real Celery worker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("CACHEWARDEN_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
PG_ADMIN_URL = os.environ.get(
    "CACHEWARDEN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_ADMIN_URL = os.environ.get(
    "CACHEWARDEN_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"
)


class CountingConnection(redis.Connection):
    """A real Redis connection that counts the commands (or pipelines) it sends."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


def unique(stem: str = "t") -> str:
    """A short unique name for a prefix, schema or queue."""
    return f"{stem}{uuid.uuid4().hex[:10]}"


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll `predicate` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def toml_value(value: Any) -> str:
    """Render a Python value as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(tables: dict[str, dict[str, Any]]) -> str:
    """Render {"redis": {...}, "entities.user": {...}} as a TOML document."""
    lines: list[str] = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines)


class WorkerProcess:
    """A real `celery -A worker worker` process running against a test config (or a
    worker of another Celery app, `app`, run in `cwd`)."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        concurrency: int = 2,
        name: str | None = None,
        env: dict[str, str] | None = None,
        app: str = "worker",
        cwd: Path = REPO,
    ) -> None:
        self.app = app
        self.cwd = cwd
        self.config = config
        self.log_path = log_path
        self.concurrency = concurrency
        self.name = name or unique("w")
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, wait: bool = True) -> WorkerProcess:
        """Start the worker and (by default) wait until it is ready."""
        env = {
            **os.environ,
            "CACHEWARDEN_CONFIG": str(self.config),
            "CACHEWARDEN_LOG_FORMAT": "json",
            **self.env,
        }
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app,
            "worker",
            "--concurrency",
            str(self.concurrency),
            "-n",
            f"{self.name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
        ]
        self._lines = []
        self.proc = subprocess.Popen(
            cmd, cwd=self.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            wait_for(lambda: self.ready or self.exited, 60, what=f"worker {self.name} ready")
            if self.exited:
                raise AssertionError(f"worker exited: {self.output()[-3000:]}")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "ab") as log:
            for raw in self.proc.stdout:
                log.write(raw)
                log.flush()
                self._lines.append(raw.decode("utf-8", "replace"))

    @property
    def ready(self) -> bool:
        """True once Celery said the worker is ready."""
        return any(" ready." in line or 'ready."' in line for line in self._lines)

    @property
    def exited(self) -> bool:
        """True when the process has ended."""
        return self.proc is not None and self.proc.poll() is not None

    def output(self) -> str:
        """Everything the worker printed so far."""
        return "".join(self._lines)

    def children(self) -> list[int]:
        """Pids of the pool processes."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once."""
        if self.proc is None or self.exited:
            self._close()
            return
        for pid in self.children():
            _signal(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        """Warm shutdown, then SIGKILL if it lingers."""
        if self.proc is None or self.exited:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"


class SchedulerProcess:
    """A real `cachewarden scheduler` process, its clock optionally moved by libfaketime."""

    def __init__(self, config: Path, log_path: Path, clock_offset_s: float = 0.0) -> None:
        env = {
            **os.environ,
            "CACHEWARDEN_CONFIG": str(config),
            "CACHEWARDEN_LOG_FORMAT": "json",
        }
        if clock_offset_s:
            assert os.path.exists(FAKETIME_LIB), (
                f"{FAKETIME_LIB} is missing: apt-get install libfaketime (.ci/run does)"
            )
            env |= {
                "LD_PRELOAD": FAKETIME_LIB,
                "FAKETIME": f"{clock_offset_s:+}",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            }
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cachewarden.operator.cli", "scheduler"],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.name = f"{os.uname().nodename}-{self.proc.pid}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self) -> SchedulerProcess:
        wait_for(lambda: "scheduler_started" in self.output(), 30, what="the scheduler to start")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class FlowerProcess:
    """A real Flower (`celery -A worker flower`) with basic auth on a free loopback port."""

    AUTH = "ops:s3cret"

    def __init__(self, config: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        env = {**os.environ, "CACHEWARDEN_CONFIG": str(config), "FLOWER_BASIC_AUTH": self.AUTH}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{port}"
        wait_for(lambda: self.status("/healthcheck") == 200, 30, what="Flower to listen")

    def status(self, path: str, auth: str | None = None) -> int:
        """The HTTP status of GET `path` (0 when nothing answers)."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url + path)
        if auth:
            request.add_header("Authorization", "Basic " + _b64(auth))
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def get(self, path: str) -> Any:
        """GET `path` as an operator, decoded from JSON."""
        import json
        import urllib.request

        request = urllib.request.Request(self.url + path)
        request.add_header("Authorization", "Basic " + _b64(self.AUTH))
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def tasks(self, name: str, state: str) -> list[dict[str, Any]]:
        """The tasks called `name` that Flower lists in `state`."""
        found = self.get("/api/tasks?limit=200")
        return [t for t in found.values() if t.get("name") == name and t.get("state") == state]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def percentile_of(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    import math

    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]
