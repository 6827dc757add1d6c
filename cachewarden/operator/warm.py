"""The warming verbs of the command line: `cachewarden warm JOB` and `cachewarden jobs`."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import threading
import time
import uuid
from typing import Any, TextIO

from cachewarden.celeryconf import task_client
from cachewarden.context import Context
from cachewarden.durations import format_duration
from cachewarden.errors import WarmFailed
from cachewarden.settings import Settings, WarmingJob
from cachewarden.warming.run import WARM_TASK, start_run
from cachewarden.warming.schedule import UTC, check_jobs, next_slot, to_ms
from cachewarden.warming.status import Run, read_runs

OK, FAILED = 0, 1
# How long `warm` waits for a worker to take the run before it says so.
PICKUP_HINT_S = 10.0


def warm(settings: Settings, args: argparse.Namespace) -> int:
    """Run a job now (on the workers, or here with --inline) and show its progress."""
    job = settings.job(args.job)
    context = Context(settings)
    request = uuid.uuid4().hex
    try:
        if args.inline:
            worker = threading.Thread(target=_inline, args=(context, job, request), daemon=True)
            worker.start()
        else:
            task_client(settings).send_task(WARM_TASK, args=[job.name, None, request])
        run = _wait_for_start(context, job, request, settings, args.timeout)
        if run is None:
            return FAILED
        return _follow(context, job, int(run), args.timeout, sys.stderr)
    finally:
        context.close()


def _inline(context: Context, job: WarmingJob, request: str) -> None:
    try:
        start_run(context, job.name, None, request, send=None)
    except WarmFailed:
        pass  # recorded in the run; _follow prints it


def _wait_for_start(
    context: Context, job: WarmingJob, request: str, settings: Settings, timeout: float
) -> int | None:
    """The run number of our request, once a worker started it (None: refused, or waited
    out `timeout`)."""
    started = time.monotonic()
    hinted = False
    while True:
        run, _, record = read_runs(context.redis, context.keys, job.name)
        if run is not None and run["request"] == request:
            return int(run["run"])
        if record.get("refused_request") == request:
            print(
                f"cachewarden: run {record.get('refused_by')} of {job.name!r} is still in "
                "progress; wait for it to end (`cachewarden jobs` shows it)",
                file=sys.stderr,
            )
            return None
        waited = time.monotonic() - started
        if waited > PICKUP_HINT_S and not hinted:
            print(
                f"cachewarden: no worker has taken the run after {PICKUP_HINT_S:.0f}s; is one "
                f"consuming {settings.queue('warming')}? (or pass --inline)",
                file=sys.stderr,
            )
            hinted = True
        if waited > timeout:
            print(f"cachewarden: no run of {job.name!r} started in {timeout:.0f}s", file=sys.stderr)
            return None
        time.sleep(0.05)


def _follow(context: Context, job: WarmingJob, number: int, timeout: float, out: TextIO) -> int:
    """Show the run's progress until it ends; 0 only when every row is in the cache."""
    began = time.monotonic()
    bar = _Bar(out)
    while True:
        run, last, _ = read_runs(context.redis, context.keys, job.name)
        if run is None or run["run"] != number:
            run = last if last is not None and last["run"] == number else None
        if run is None:
            bar.done(f"run {number} of {job.name!r} was replaced by a newer run")
            return FAILED
        if run.state not in ("running", "abandoned"):
            return _outcome(job, run, bar)
        bar.show(run, time.monotonic() - began)
        if time.monotonic() - began > timeout:
            bar.done(f"run {number} of {job.name!r} did not end in {timeout:.0f}s")
            return FAILED
        time.sleep(0.1)


def _outcome(job: WarmingJob, run: Run, bar: _Bar) -> int:
    seconds = (run.duration_ms or 0) / 1000
    rows = int(run["rows"] or 0)
    if run.state == "failed":
        bar.done(f"run {run['run']} of {job.name!r} FAILED after {seconds:.1f}s: {run['error']}")
        return FAILED
    rate = rows / seconds if seconds else float(rows)
    text = (
        f"warmed {rows:,} rows of {job.entity} in {seconds:.1f}s ({rate:,.0f} rows/s): "
        f"{run['filled']:,} filled, {run['skipped']:,} left to a newer write"
    )
    if run["invalid"]:
        text += f", {run['invalid']:,} could not be cached (see the worker's log)"
    bar.done(text)
    return OK if run.complete else FAILED


class _Bar:
    """A progress line: a bar on a terminal, a line every few seconds elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.printed = 0.0

    def show(self, run: Run, elapsed: float) -> None:
        now = time.monotonic()
        if not self.tty and now - self.printed < 2:
            return
        self.printed = now
        rows, total = int(run["rows"] or 0), int(run["total"])
        rate = rows / elapsed if elapsed > 0 else 0.0
        if total < 0:
            text = f"{rows:,} rows, counting the rest... {rate:,.0f} rows/s"
        else:
            share = rows / total if total else 1.0
            eta = (total - rows) / rate if rate else 0.0
            filled = int(share * 30)
            text = (
                f"[{'#' * filled}{'.' * (30 - filled)}] {rows:,}/{total:,} rows "
                f"{rate:,.0f} rows/s ETA {eta:.0f}s"
            )
        if self.tty:
            self.out.write("\r" + text.ljust(78))
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self, text: str) -> None:
        if self.tty:
            self.out.write("\r" + " " * 78 + "\r")
        self.out.write(text + "\n")
        self.out.flush()


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    at = datetime.datetime.fromtimestamp(ms / 1000, UTC)
    return at.strftime("%Y-%m-%d %H:%M:%S")


def job_rows(settings: Settings, context: Context) -> list[dict[str, Any]]:
    """Each job: its schedule, next and last run, duration, rows and outcome."""
    triggers = check_jobs(settings)
    now = datetime.datetime.now(UTC)
    out = []
    for name, job in settings.warming.items():
        run, last, record = read_runs(context.redis, context.keys, name)
        upcoming = next_slot(triggers[name], now) if job.enabled else None
        shown = run if run is not None and run.state in ("running", "abandoned") else last
        out.append(
            {
                "job": name,
                "entity": job.entity,
                "schedule": job.schedule,
                "enabled": job.enabled,
                "next_ms": None if upcoming is None else to_ms(upcoming),
                "last_slot_ms": int(record["slot"]) if record.get("slot") else None,
                "missed": int(record.get("missed", 0)),
                "overlaps": int(record.get("overlaps", 0)),
                "run": None if shown is None else shown.fields,
                "outcome": None if shown is None else shown.state,
            }
        )
    return out


def jobs(settings: Settings, args: argparse.Namespace) -> int:
    """List the warming jobs: schedule, next and last run, duration, rows, outcome."""
    context = Context(settings)
    try:
        rows = job_rows(settings, context)
    finally:
        context.close()
    if args.json:
        print(json.dumps(rows))
        return OK
    if not rows:
        print(f"no warming jobs in {settings.source} (add a [warming.NAME] table)")
        return OK
    header = ("JOB", "ENTITY", "SCHEDULE", "NEXT", "LAST RUN", "DURATION", "ROWS", "OUTCOME")
    table = [header]
    for row in rows:
        run = row["run"] or {}
        duration = run.get("finished_ms") and run["finished_ms"] - run["started_ms"]
        outcome = row["outcome"] or "never run"
        if run.get("error"):
            outcome += f": {run['error']}"
        table.append(
            (
                row["job"],
                row["entity"],
                row["schedule"] if row["enabled"] else f"{row['schedule']} (disabled)",
                _when(row["next_ms"]),
                _when(run.get("started_ms")),
                format_duration(int(duration)) if duration else "-",
                f"{run.get('rows', 0):,}" if run else "-",
                outcome,
            )
        )
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header) - 1)]
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return OK
