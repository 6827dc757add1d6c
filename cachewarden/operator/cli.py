"""The `cachewarden` command line.

Every command reads the config first; a config error prints one line naming
the file, the field and the problem, and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

from cachewarden.connections import as_worker
from cachewarden.errors import CachewardenError, ConfigError
from cachewarden.logs import configure_logging
from cachewarden.settings import CONFIG_ENV, Settings, config_path, load_settings

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
Command = Callable[[Settings, argparse.Namespace], int]

# Verbs that do a worker's work in this process (or run one): the worker's Redis
# timeouts, not an application's one second.
WORKER_VERBS = frozenset({"scheduler", "warm", "reshard", "flush", "dead-letters", "dlq", "run"})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachewarden",
        description="Background cache maintenance: write-behind for Redis + SQL.",
    )
    parser.add_argument(
        "--config", help=f"config file (default: ${CONFIG_ENV} or config/cachewarden.toml)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "check",
        help="validate the config, connect to Redis and the database, print what is defined",
    )
    status = sub.add_parser(
        "status", help="per entity: pending, lag, dead letters, reads, last flush; jobs; workers"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    probe = sub.add_parser(
        "probe", help="liveness or readiness of the workers on this host (for exec probes)"
    )
    probe.add_argument("kind", choices=["live", "ready"])
    probe.add_argument("--node", help="only this worker node (celery@host); default: all here")
    stats = sub.add_parser("stats", help="pending writes, due shards and dead letters per entity")
    stats.add_argument("--json", action="store_true", help="print JSON")
    worker = sub.add_parser(
        "worker",
        help="run a Celery worker (celery -A cachewarden.worker worker); extra args go to celery",
    )
    worker.add_argument("celery_args", nargs=argparse.REMAINDER)
    flower = sub.add_parser(
        "flower",
        help="run Flower on 127.0.0.1 (needs FLOWER_BASIC_AUTH=user:password); extra args go "
        "to Flower",
    )
    flower.add_argument("celery_args", nargs=argparse.REMAINDER)
    sub.add_parser(
        "scheduler", help="run an APScheduler process firing the warming jobs (any number may run)"
    )
    warm = sub.add_parser(
        "warm", help="run a warming job now and show its progress (exit 0: every row cached)"
    )
    warm.add_argument("job", help="a [warming.JOB] of the config")
    warm.add_argument(
        "--inline", action="store_true", help="run it in this process instead of on the workers"
    )
    warm.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    jobs = sub.add_parser("jobs", help="the warming jobs: schedule, next and last run, outcome")
    jobs.add_argument("--json", action="store_true", help="print JSON")
    run = sub.add_parser(
        "run",
        help="try it: worker, scheduler and Flower (embedded Redis if none answers), and a demo",
    )
    run.add_argument("--no-embedded", action="store_true", help="never start the embedded Redis")
    run.add_argument("--no-demo", action="store_true", help="start everything, skip the demo")
    for name in ("dlq", "dead-letters"):
        _dead_letter_parser(sub, name)
    flush = sub.add_parser(
        "flush", help="flush the write buffer now (one entity, or all) and wait until it drains"
    )
    flush.add_argument("entity", nargs="?", help="only this entity")
    flush.add_argument(
        "--timeout", type=float, default=300.0, help="give up after this many seconds (300)"
    )
    doctor = sub.add_parser(
        "doctor",
        help="check Redis, the broker, the database, the grants and the workers; say each fix",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON")
    reshard = sub.add_parser(
        "reshard",
        help="move an entity's write buffer to N shards (writes wait while it drains)",
    )
    reshard.add_argument("entity")
    reshard.add_argument("shards", type=int)
    demo = sub.add_parser("demo", help="demo helpers")
    demo.add_argument("action", choices=["init"], help="init: create the demo entity's table")
    return parser


def _dead_letter_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str
) -> None:
    """`dlq` (and its older name `dead-letters`): rows the database rejected."""
    text = "dead letters: rows the database rejected (list, show, replay, drop)"
    dead = sub.add_parser(name, help=text if name == "dlq" else "the older name of dlq")
    dead_sub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, helptext in (
        ("list", "show dead letters, oldest first"),
        ("show", "one dead letter in full (JSON), by --id"),
        ("replay", "enqueue dead letters again"),
        ("drop", "delete dead letters for good"),
        ("discard", "the older name of drop"),
    ):
        p = dead_sub.add_parser(action, help=helptext)
        p.add_argument("entity")
        p.add_argument(
            "--id",
            action="append",
            dest="ids",
            required=action == "show",
            help="only this dead-letter id (repeatable)",
        )
        p.add_argument("--count", type=int, default=1000, help="at most this many (default 1000)")
        if action == "list":
            p.add_argument("--json", action="store_true", help="print JSON lines")
        if action == "replay":
            p.add_argument(
                "--force", action="store_true", help="replay even where a newer write superseded it"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    # `worker`'s and `flower`'s options go to Celery (argparse's REMAINDER drops a
    # leading "--option").
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("worker", "flower"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("worker", "flower"):
        args.celery_args = [*extra, *args.celery_args]
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"cachewarden: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging()
    if args.command in WORKER_VERBS:
        as_worker()  # the worker's Redis timeouts: these do the workers' work
    from cachewarden.operator import commands

    handlers: dict[str, Command] = {
        "check": commands.check,
        "stats": commands.stats,
        "status": commands.status,
        "probe": commands.probe,
        "worker": lambda s, a: _celery(s, args.config, ["worker", *a.celery_args], replace=True),
        "flower": lambda s, a: _celery(s, args.config, ["flower", *a.celery_args], replace=True),
        "scheduler": commands.scheduler,
        "warm": commands.warm,
        "jobs": commands.jobs,
        "run": lambda s, a: _run(s, args.config, a.no_embedded, not a.no_demo),
        "dead-letters": commands.dead_letters,
        "dlq": commands.dead_letters,
        "flush": commands.flush,
        "reshard": commands.reshard,
        "doctor": commands.doctor,
        "demo": commands.demo,
    }
    try:
        return handlers[args.command](settings, args)
    except ConfigError as exc:
        print(f"cachewarden: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except CachewardenError as exc:
        print(f"cachewarden: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK


def _celery(settings: Settings, config: str | None, argv: list[str], replace: bool = False) -> int:
    """Run `celery -A cachewarden.worker ...` (the installed deployment, from any
    directory) with this config; with `replace`, this process becomes Celery (exec), so
    signals reach the worker itself."""
    env = {**os.environ, CONFIG_ENV: str(config_path(config).resolve())}
    cmd = [sys.executable, "-m", "celery", "-A", "cachewarden.worker", *argv]
    if argv[:1] == ["worker"] and "--loglevel" not in argv and "-l" not in argv:
        cmd += ["--loglevel", "INFO"]
    if replace:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, cmd, env)
    return subprocess.call(cmd, env=env)


def _run(settings: Settings, config: str | None, no_embedded: bool, demo: bool) -> int:
    """Everything on this machine, with the embedded Redis if none answers, and a demo."""
    from cachewarden.operator.devrun import run

    return run(settings, config, no_embedded, demo, sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
