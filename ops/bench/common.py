"""What the benchmarks in this folder share: one run's resources, workers, and the report.

Both scripts (writebehind.py, readpath.py) import this module from their own
directory, so they run as `.venv/bin/python ops/bench/<name>.py` from the
repository root. Here:

- `Env`: one run's resources, all named after a fresh run id: a PostgreSQL schema,
  a Redis key prefix and Celery queues (every name contains `Env.base`), a temp dir
  for configs and logs; `config()` writes a phase's config file; `cleanup()`
  removes all of it, and stops the workers and child processes the run started.
- `Worker`: a real `celery -A worker worker` process group started from the
  repository root on one config, with its JSON log.
- `run()`: the common `main`: signals that unwind through the cleanup, the
  header (command, machine, versions), the environment around the phases.
- `run_phase()`, `percentile()`, `Zipf`, `CpuSample`, `loadavg()`, `say()`,
  `render()` and `verdict()`: timing, sampling and the result table.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

try:
    import psycopg
    import redis

    import cachewarden  # noqa: F401  (every run needs it; --help does not)
except ImportError as exc:  # --help works anywhere; a run says what is missing
    MISSING: ImportError | None = exc
else:
    MISSING = None

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


# -- logging and small measures -----------------------------------------------------------


def say(message: str) -> None:
    """A progress line on stderr (the results go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def percentile(values: list[float] | list[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return float(ordered[max(1, math.ceil(q * len(ordered))) - 1])


class Zipf:
    """Ranks 1..n with P(k) proportional to 1/k**s (random + bisect; no numpy).

    The table is built once; each thread or caller draws with its own `random.Random`.
    """

    def __init__(self, n: int, s: float) -> None:
        total = 0.0
        self.cumulative: list[float] = []
        for k in range(1, n + 1):
            total += 1.0 / k**s
            self.cumulative.append(total)
        self.total = total

    def sample(self, rng: random.Random) -> int:
        at = bisect.bisect_left(self.cumulative, rng.random() * self.total)
        return min(at, len(self.cumulative) - 1) + 1


def run_phase(name: str, fn: Callable[[], T]) -> T:
    """Run one phase, saying when it starts and how long it took."""
    say(f"phase: {name}")
    started = time.monotonic()
    result = fn()
    say(f"phase {name}: done in {time.monotonic() - started:.1f} s")
    return result


# -- CPU sampling -------------------------------------------------------------------------


def _proc_stats() -> Iterator[tuple[int, str, int, float]]:
    """(pid, command name, process group, CPU seconds) of every process in /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        yield int(entry), name, int(fields[2]), (int(fields[11]) + int(fields[12])) / tick


@dataclass
class CpuSample:
    """CPU seconds used so far by: one process group (a worker), PostgreSQL, Redis, the machine."""

    worker: float
    postgres: float
    redis_cpu: float
    busy: float
    total: float

    @classmethod
    def take(cls, worker_pgid: int, client: redis.Redis) -> CpuSample:
        worker = postgres = 0.0
        for _, name, pgrp, seconds in _proc_stats():
            if pgrp == worker_pgid:
                worker += seconds
            elif name == "postgres":
                postgres += seconds
        info = client.info("cpu")
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        idle = ticks[3] + ticks[4]
        return cls(
            worker,
            postgres,
            float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            (sum(ticks) - idle) / tick,
            sum(ticks) / tick,
        )

    def __add__(self, other: CpuSample) -> CpuSample:
        return CpuSample(
            self.worker + other.worker,
            self.postgres + other.postgres,
            self.redis_cpu + other.redis_cpu,
            self.busy + other.busy,
            self.total + other.total,
        )

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(
            self.worker - other.worker,
            self.postgres - other.postgres,
            self.redis_cpu - other.redis_cpu,
            self.busy - other.busy,
            self.total - other.total,
        )

    def per_row(self, later: CpuSample, rows: int) -> str:
        def us(a: float, b: float) -> str:
            return f"{(b - a) / rows * 1e6:.1f} us"

        busy = (later.busy - self.busy) / max(later.total - self.total, 1e-9)
        return (
            f"CPU per row: worker processes {us(self.worker, later.worker)}, "
            f"PostgreSQL {us(self.postgres, later.postgres)}*, "
            f"Redis {us(self.redis_cpu, later.redis_cpu)}*; machine busy {busy:.0%} "
            "(*server-wide: includes any other clients of the server)"
        )


# -- the result table ---------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "not run" if ok is None else ("PASS" if ok else "MISS")


def render(rows: list[list[str]]) -> str:
    """A markdown table; the first row is the header."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append(
            "| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) + " |"
        )
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# -- workers ------------------------------------------------------------------------------


class Worker:
    """A real `celery -A worker worker` process group started from the repository root."""

    def __init__(self, config: Path, log: Path, concurrency: int) -> None:
        self.config, self.log, self.concurrency = config, log, concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> Worker:
        env = {
            **os.environ,
            "CACHEWARDEN_CONFIG": str(self.config),
            "CACHEWARDEN_LOG_FORMAT": "json",
            # `-A worker` is the repository's worker/ package, found from the root.
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
            ),
        }
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            "worker",
            "--concurrency",
            str(self.concurrency),
            "-n",
            f"bench-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the worker did not get ready in {timeout:.0f}s:\n{self.tail()}"
                )
            time.sleep(0.05)
        return self

    @property
    def pgid(self) -> int:
        """The worker's process group (start_new_session: the id of the process we started)."""
        assert self.proc is not None
        return self.proc.pid

    def _ready(self) -> bool:
        text = self.log.read_text(errors="replace")
        return " ready." in text or 'ready."' in text

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def events(self, *names: str) -> Iterator[dict[str, Any]]:
        """The worker's JSON log lines whose event is one of `names`."""
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and any(name in line for name in names):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") in names:
                    yield event

    def stop(self) -> None:
        """Warm shutdown, then SIGKILL whatever of our process group lingers.

        SIGTERM goes to the main process only: sent to the whole group, it kills the
        pool processes at once, mid-task (Celery then logs WorkerLostError and the
        task's last log lines are missing); the main process waits for them.
        """
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                say(f"worker {self.proc.pid} did not stop in 30 s; killing its process group")
        try:
            os.killpg(self.pgid, signal.SIGKILL)  # pool processes left behind, if any
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)


# -- one run's resources ------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """A TOML value for a str, int, float or bool (JSON's spelling of these is TOML's)."""
    return json.dumps(value)


class Env:
    """One run's resources: names, URLs, temp dir, workers, child processes.

    Everything is removed by cleanup(), also when a phase failed half-way.
    """

    schema_prefix = "cwbench"  # the schema is <schema_prefix>_<run id>
    key_prefix = "cwb"  # every Redis key and queue name contains <key_prefix><run id>
    entity = "row"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:8]
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.schema_prefix}-"))
        self.workers: list[Worker] = []
        self.children: list[subprocess.Popen[str]] = []

    @property
    def schema(self) -> str:
        return f"{self.schema_prefix}_{self.run_id}"

    @property
    def base(self) -> str:
        """Every Redis key and Celery queue of this run contains this."""
        return f"{self.key_prefix}{self.run_id}"

    @property
    def sa_url(self) -> str:
        """The SQLAlchemy URL of the run's schema (its connections are named after the run)."""
        return (
            f"{self.args.pg_url}?options=-csearch_path%3D{self.schema}"
            f"&application_name={self.schema}"
        )

    def pg(self, autocommit: bool = True) -> psycopg.Connection[Any]:
        dsn = self.args.pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
        return psycopg.connect(
            dsn,
            autocommit=autocommit,
            options=f"-csearch_path={self.schema}",
            application_name=self.schema,
        )

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.args.redis_url, decode_responses=True)

    def setup(self) -> None:
        """Create the schema (a subclass adds its tables)."""
        with self.pg() as conn:
            conn.execute(f'CREATE SCHEMA "{self.schema}"')

    def config(
        self,
        name: str,
        table: str,
        entity: Mapping[str, Any],
        write_behind: Mapping[str, Any] | None = None,
        file: str = "",
        database_url: str = "",
        redis_table: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a config with its own key prefix and queue (both named by `name`): one
        entity on `table` keyed by `id`, with `entity` and `write_behind` settings (on
        the run's PostgreSQL schema unless `database_url` names another database), and
        `redis_table`'s keys in [redis] (a `url` there replaces --redis-url)."""
        redis_keys = {"url": self.args.redis_url, **(redis_table or {})}
        lines = [
            "[redis]",
            f"url = {toml_value(redis_keys.pop('url'))}",
            f"prefix = {toml_value(f'{self.base}-{name}')}",
            *(f"{key} = {toml_value(value)}" for key, value in redis_keys.items()),
            "",
            "[database]",
            f"url = {toml_value(database_url or self.sa_url)}",
            "",
            "[celery]",
            f"queue = {toml_value(f'{self.base}-{name}-q')}",
            "",
            "[dispatch]",
            'interval = "50ms"',
            "",
            f"[entities.{self.entity}]",
            f"table = {toml_value(table)}",
            'key = "id"',
            *(f"{key} = {toml_value(value)}" for key, value in entity.items()),
        ]
        if write_behind:
            lines += ["", f"[entities.{self.entity}.write_behind]"]
            lines += [f"{key} = {toml_value(value)}" for key, value in write_behind.items()]
        path = self.tmp / f"{file or name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def worker(self, config: Path, log_name: str, concurrency: int | None = None) -> Worker:
        """Start a worker on `config` (stopped by cleanup() if not before)."""
        worker = Worker(config, self.tmp / log_name, concurrency or self.args.concurrency)
        self.workers.append(worker)
        return worker.start()

    def spawn(self, argv: list[str]) -> subprocess.Popen[str]:
        """A child process of ours, lines on stdin and stdout (killed by cleanup())."""
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.children.append(proc)
        return proc

    def reap(self, proc: subprocess.Popen[str]) -> None:
        """Kill one child if it still runs, and close its pipes."""
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        if proc in self.children:
            self.children.remove(proc)

    def cleanup(self) -> None:
        """Stop what we started, then delete the keys, the schema and the temp dir."""
        for proc in list(self.children):
            try:
                self.reap(proc)
            except (OSError, subprocess.TimeoutExpired) as exc:
                say(f"cleanup: child process {proc.pid} not stopped: {exc}")
        for w in self.workers:
            try:
                w.stop()
            except (OSError, subprocess.TimeoutExpired) as exc:
                say(f"cleanup: worker {w.proc.pid if w.proc else '?'} not stopped: {exc}")
        try:
            client = self.redis()
            batch: list[str] = []
            for key in client.scan_iter(f"*{self.base}*", count=5000):
                batch.append(key)
                if len(batch) >= 1000:
                    client.delete(*batch)
                    batch = []
            if batch:
                client.delete(*batch)
            client.close()
        except redis.RedisError as exc:
            say(f"cleanup: Redis keys under {self.base!r} not removed: {exc}")
        try:
            with self.pg() as conn:
                # Whatever of ours still holds a connection (a killed child's backend
                # finishing its query) must not make the DROP wait.
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND pid <> pg_backend_pid()",
                    (self.schema,),
                )
                conn.execute("SET lock_timeout = '30s'")
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        except psycopg.Error as exc:
            say(f"cleanup: schema {self.schema} not dropped: {exc}")
        if self.args.keep_logs:
            say(f"logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


@contextmanager
def environment(env: Env) -> Iterator[Env]:
    """Set up `env`, and clean it up however the block ends (Ctrl-C and SIGTERM included)."""
    try:
        env.setup()
        yield env
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            env.cleanup()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the cleanup, like Ctrl-C


def versions(env: Env, extra: str = "") -> str:
    try:
        client = env.redis()
        rv = client.info("server").get("redis_version", "?")
        client.close()
    except redis.RedisError:
        rv = "?"
    with env.pg() as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return (
        f"Python {platform.python_version()}, Redis {rv}, PostgreSQL "
        f"{row[0] if row else '?'}, redis-py {redis.__version__} (hiredis "
        f"{'on' if redis.utils.HIREDIS_AVAILABLE else 'off'}), psycopg {psycopg.__version__}"
        + extra
    )


def add_common_args(
    p: argparse.ArgumentParser,
    redis_db: int,
    phases: tuple[str, ...],
    optional: tuple[str, ...] = (),
) -> None:
    """The options both benchmarks take: servers, worker size, phases, seed, logs.

    `phases` run by default; `optional` ones only when --phases names them."""
    p.add_argument("--concurrency", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--redis-url",
        default=f"redis://127.0.0.1:6379/{redis_db}",
        help=f"Redis for the caches and the Celery broker (default db {redis_db})",
    )
    p.add_argument(
        "--pg-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="PostgreSQL (a fresh schema is created in it and dropped after)",
    )
    also = f" (default), or also: {','.join(optional)}" if optional else ""
    p.add_argument(
        "--phases",
        default=",".join(phases),
        help=f"comma-separated subset of: {','.join(phases)}{also}",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir (worker logs)")


def parse_phases(
    p: argparse.ArgumentParser, args: argparse.Namespace, known: tuple[str, ...]
) -> None:
    """Turn args.phases into a set, refusing unknown names."""
    args.phases = {s.strip() for s in args.phases.split(",") if s.strip()}
    unknown = args.phases - set(known)
    if unknown:
        p.error(f"unknown phase(s): {', '.join(sorted(unknown))}")


def run(
    title: str,
    script: str,
    env: Callable[[], Env],
    body: Callable[[Env], bool],
    note: str = "",
    extra_versions: Callable[[], str] = lambda: "",
) -> int:
    """The benchmarks' main: header, environment, `body(env)` (True: no target missed).

    Exit status 0 when no target was missed, 1 when one was, 2 when it cannot run.
    """
    if MISSING is not None:
        print(
            f"cannot run: {MISSING}. Run it with the project's environment: "
            f".venv/bin/python {script}",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # also when started in the background (SIG_IGN)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _stop)
    print(title)
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(
        f"machine: nproc={os.cpu_count()} ({platform.machine()}, {platform.system()}), "
        f"load average at start: {loadavg()}"
    )
    if note:
        print(note)
    with environment(env()) as e:
        print(f"versions: {versions(e, extra_versions())}")
        sys.stdout.flush()
        ok = body(e)
    return 0 if ok else 1
