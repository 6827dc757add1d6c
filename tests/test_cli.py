"""The `cachewarden` command line, run as a user would run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from cachewarden.errors import ConfigError
from tests.conftest import Harness
from tests.helpers import REPO

USER = {"table": "users", "key": "id", "ttl": "10m", "version_column": "version"}


def cachewarden(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script and capture its output."""
    argv = [sys.executable, "-m", "cachewarden.operator.cli"]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_config_error_is_one_line_and_status_2(tmp_path: Path) -> None:
    """A bad config exits with status 2 and one line naming the file, the field and the fix."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[entities.user]\ntable = "users"\nkey = "id"\nttl = "ten minutes"\n')
    result = cachewarden("check", config=bad)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(bad) in lines[0]
    assert "entities.user.ttl" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_status_2(tmp_path: Path) -> None:
    """A config path that does not exist exits with status 2 and says how to point at one."""
    result = cachewarden("stats", config=tmp_path / "nope.toml")
    assert result.returncode == 2
    assert "not found" in result.stderr and "--config" in result.stderr


def test_unknown_setting_is_named(tmp_path: Path) -> None:
    """A misspelt setting is an error naming the setting, not silently ignored."""
    bad = tmp_path / "typo.toml"
    bad.write_text(
        '[entities.user]\ntable = "users"\nkey = "id"\nttl = "1m"\n'
        "[entities.user.write_behind]\nbatchsize = 10\n"
    )
    result = cachewarden("check", config=bad)
    assert result.returncode == 2
    assert "entities.user.write_behind.batchsize" in result.stderr


def test_check_connects_and_prints_entities(pg_harness: Harness) -> None:
    """`check` validates, connects to Redis and the database, and prints each entity."""
    pg_harness.create_table("users")
    pg_harness.configure({"user": USER})
    result = cachewarden("check", config=pg_harness.config_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "redis:" in result.stdout and "ok" in result.stdout
    assert "user: table=users key=id ttl=10m" in result.stdout
    assert "table users: ok" in result.stdout


def test_check_fails_on_a_missing_table(pg_harness: Harness) -> None:
    """`check` exits non-zero and names the entity's missing table."""
    pg_harness.configure({"user": USER})
    result = cachewarden("check", config=pg_harness.config_path)
    assert result.returncode == 1
    assert "entities.user.table" in result.stdout and "'users' does not exist" in result.stdout


def test_stats_counts_pending_writes(pg_harness: Harness) -> None:
    """`stats --json` reports the writes waiting in each shard."""
    pg_harness.create_table("users")
    pg_harness.configure({"user": USER}, {"user": {"shards": 2}})
    for key in range(10):
        pg_harness.cache.write("user", key, {"name": "x", "version": 1})
    result = cachewarden("stats", "--json", config=pg_harness.config_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["user"]["pending"] == 10
    assert sum(data["user"]["pending_per_shard"]) == 10
    assert data["user"]["dead_letters"] == 0


def test_stats_shows_read_path_counters(pg_harness: Harness) -> None:
    """`stats` reports the read path's loads next to the write buffer."""
    pg_harness.create_table("users")
    pg_harness.configure({"user": USER})
    pg_harness.cache.get("user", 5)  # a miss: one load, cached as absent
    result = cachewarden("stats", "--json", config=pg_harness.config_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["user"]["read"]["loads"] == 1
    plain = cachewarden("stats", config=pg_harness.config_path)
    assert "loads=1" in plain.stdout


def test_demo_init_creates_the_table(pg_harness: Harness) -> None:
    """`demo init` creates each entity's table so the demo worker has somewhere to write."""
    pg_harness.configure({"user": USER})
    result = cachewarden("demo", "init", config=pg_harness.config_path)
    assert result.returncode == 0, result.stderr
    assert pg_harness.count("users") == 0


def test_doctor_warns_when_the_buffer_bounds_cannot_fit_in_maxmemory(pg_harness: Harness) -> None:
    """`cachewarden doctor` fails its buffer-bounds check naming the bounds when max_pending x shards cannot fit in a 30 MB Redis, and passes it when they can."""
    from tests.servers import PrivateRedis

    h = pg_harness
    h.create_table("users")
    with PrivateRedis(maxmemory="30mb", **{"maxmemory-policy": "noeviction"}) as server:
        h.configure({"user": USER}, redis_url=server.url)  # 100,000 x 4 shards
        too_big = cachewarden("doctor", config=h.config_path)
        h.configure(
            {"user": USER}, {"user": {"max_pending": 1000, "shards": 1}}, redis_url=server.url
        )
        fits = cachewarden("doctor", config=h.config_path)
    assert too_big.returncode == 1, too_big.stdout + too_big.stderr
    assert "FAIL  buffer bounds" in too_big.stdout
    assert (
        "user: 400,000 writes" in too_big.stdout
        and "Lower write_behind.max_pending" in too_big.stdout
    )
    assert "fix: raise maxmemory to at least" in too_big.stdout, too_big.stdout
    assert "PASS  buffer bounds: maxmemory 30 MB: the write buffers fit" in fits.stdout, fits.stdout


def _doctor_lines(h: Harness) -> dict[str, tuple[bool, str]]:
    """`cachewarden doctor --json`: check -> (ok, detail and fix)."""
    result = cachewarden("doctor", "--json", config=h.config_path)
    return {f["check"]: (f["ok"], f"{f['detail']} {f['fix']}") for f in json.loads(result.stdout)}


def test_doctor_fails_an_evicting_or_forgetful_redis_and_passes_a_correct_one(
    pg_harness: Harness,
) -> None:
    """`doctor` fails, naming the fix, against a Redis with maxmemory-policy allkeys-lru and against one with no persistence; against one with AOF and noeviction, a table it may write and a worker consuming every queue, every check passes and it exits 0."""
    from tests.servers import PrivateRedis

    h = pg_harness
    h.create_table("users")
    lru = {"maxmemory": "100mb", "maxmemory-policy": "allkeys-lru"}
    with PrivateRedis(**lru) as server:
        h.configure({"user": USER}, redis_url=server.url)
        ok, text = _doctor_lines(h)["maxmemory-policy"]
        assert not ok and "allkeys-lru" in text and "noeviction" in text
    with PrivateRedis(appendonly="no") as server:
        h.configure({"user": USER}, redis_url=server.url)
        ok, text = _doctor_lines(h)["persistence"]
        assert not ok and "AOF is OFF" in text and "appendonly yes" in text
    with PrivateRedis(appendfsync="everysec", maxmemory="200mb") as server:
        h.configure(
            {"user": USER}, {"user": {"max_pending": 1000, "shards": 1}}, redis_url=server.url
        )
        h.worker(concurrency=1)
        result = cachewarden("doctor", config=h.config_path)
        for w in h.workers:
            w.kill()
    assert result.returncode == 0, result.stdout
    for check in ("redis version", "persistence", "maxmemory-policy", "broker", "database"):
        assert f"PASS  {check}" in result.stdout, result.stdout
    assert "PASS  write users" in result.stdout and "PASS  workers: 1 online" in result.stdout


def test_every_failed_doctor_finding_names_a_concrete_fix(pg_harness: Harness) -> None:
    """Against a Redis with no maxmemory and no worker running, each failed doctor finding's fix is concrete: the buffer bounds name the maxmemory to set in MB, and no fix points at figures elsewhere."""
    from tests.servers import PrivateRedis

    h = pg_harness
    h.create_table("users")
    with PrivateRedis() as server:
        h.configure({"user": USER}, redis_url=server.url)
        result = cachewarden("doctor", "--json", config=h.config_path)
    findings = json.loads(result.stdout)
    failed = [f for f in findings if not f["ok"]]
    assert failed, result.stdout
    for finding in failed:
        assert finding["fix"] and "above" not in finding["fix"], finding
    (bounds,) = [f for f in findings if f["check"] == "buffer bounds"]
    assert not bounds["ok"] and "no maxmemory" in bounds["detail"]
    assert "set maxmemory" in bounds["fix"] and " MB " in bounds["fix"], bounds["fix"]


def test_check_names_a_warming_job_whose_query_fails_and_a_bad_cron(pg_harness: Harness) -> None:
    """`check` runs each warming job's query for no rows and names the job whose SQL fails (exit 1); a cron APScheduler refuses is a config error naming the field (exit 2) before `check` reports the config valid."""
    h = pg_harness
    h.create_table("users")
    jobs = {
        "good": {"entity": "user", "every": "1m"},
        "bad": {"entity": "user", "every": "1m", "query": "SELECT id FROM nowhere"},
    }
    h.configure({"user": USER}, warming=jobs)
    result = cachewarden("check", config=h.config_path)
    assert result.returncode == 1
    assert "good: entity=user every 1m" in result.stdout
    assert "query: FAILED: warming job 'bad'" in result.stdout and "nowhere" in result.stdout
    with pytest.raises(ConfigError, match=r"warming\.late\.cron"):  # the file is written first
        h.configure({"user": USER}, warming={"late": {"entity": "user", "cron": "0 25 * * *"}})
    result = cachewarden("check", config=h.config_path)
    assert result.returncode == 2 and "warming.late.cron" in result.stderr
    assert "(valid)" not in result.stdout and "redis:" not in result.stdout


def test_warm_inline_needs_no_worker_and_jobs_shows_the_run(pg_harness: Harness) -> None:
    """`warm --inline` caches every row without a worker and exits 0; `jobs` then shows the run done with its rows, and `warm` of an unknown job exits 1 naming the defined ones."""
    h = pg_harness
    h.create_table("users")
    with h.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id, name) VALUES (1, 'a'), (2, 'b')"))
    h.configure({"user": USER}, warming={"all": {"entity": "user", "every": "1h"}})
    result = cachewarden("warm", "all", "--inline", config=h.config_path)
    assert result.returncode == 0, result.stderr
    assert "warmed 2 rows of user" in result.stderr
    assert h.cache.get("user", 2) == {"id": 2, "name": "b", "version": 0}
    listed = cachewarden("jobs", config=h.config_path)
    assert listed.returncode == 0
    line = next(x for x in listed.stdout.splitlines() if x.startswith("all "))
    assert "every 1h" in line and line.rstrip().endswith("done") and " 2 " in line
    unknown = cachewarden("warm", "nope", config=h.config_path)
    assert unknown.returncode == 1 and "unknown warming job 'nope'" in unknown.stderr
    assert "defines: all" in unknown.stderr


def test_flush_drains_the_buffer_now_and_waits(pg_harness: Harness) -> None:
    """`cachewarden flush user` with a max_delay of one minute gets 50 pending writes into the database within seconds and exits 0 once none is pending."""
    h = pg_harness
    h.create_table("users")
    h.configure({"user": USER}, {"user": {"max_delay": "60s"}})
    h.worker(concurrency=1)
    for key in range(50):
        h.cache.write("user", key, {"name": "x", "version": 1})
    assert h.buffered() == 50
    started = time.monotonic()
    result = cachewarden("flush", "user", config=h.config_path)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 20
    assert "50 pending writes of user reached the database" in result.stdout
    assert h.count("users") == 50 and h.buffered() == 0


def test_worker_command_becomes_celery_so_sigterm_is_a_warm_shutdown(pg_harness: Harness) -> None:
    """`cachewarden worker` replaces itself with the Celery worker: the pid it started as is Celery's main process, and SIGTERM to it ends in a warm shutdown with status 0."""
    h = pg_harness
    h.create_table("users")
    h.configure({"user": USER})
    env = {**os.environ, "CACHEWARDEN_CONFIG": str(h.config_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachewarden.operator.cli", "worker", "--concurrency", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if " ready." in line or 'ready."' in line:
                break
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"celery" in cmdline and b"cachewarden.operator.cli" not in cmdline
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0
        assert "warm shutdown" in (rest + "".join(lines)).lower()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_check_and_doctor_refuse_a_key_without_a_unique_constraint(pg_harness: Harness) -> None:
    """`check` and `doctor` fail (no traceback) on a key column with no primary key or unique constraint, naming the table, the column and the constraint to add."""
    h = pg_harness
    with h.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE users (id INTEGER NOT NULL, name TEXT, version BIGINT)"))
    h.configure({"user": USER})
    checked = cachewarden("check", config=h.config_path)
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert "table users: FAILED" in checked.stdout
    assert "column 'id' of table 'users'" in checked.stdout
    assert "ADD PRIMARY KEY (id)" in checked.stdout
    doctored = cachewarden("doctor", "--json", config=h.config_path)
    assert "Traceback" not in doctored.stderr, doctored.stderr
    findings = {f["check"]: f for f in json.loads(doctored.stdout)}
    table = findings["table users"]
    assert not table["ok"] and "column 'id' of table 'users'" in table["detail"]
    assert "ADD PRIMARY KEY (id)" in table["fix"]


def test_doctor_checks_the_grants_of_a_table_keyed_by_a_unique_column(pg_harness: Harness) -> None:
    """`doctor` passes the write check of a table whose key is unique but which has no primary key."""
    h = pg_harness
    with h.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE users (id INTEGER UNIQUE, name TEXT, version BIGINT)"))
    h.configure({"user": USER})
    ok, text = _doctor_lines(h)["write users"]
    assert ok and "INSERT, UPDATE and DELETE allowed" in text


def _without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter where importing `module` fails (None in sys.modules)."""
    prelude = f"import sys; sys.modules[{module!r}] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def test_check_names_the_extra_of_a_missing_database_driver(pg_harness: Harness) -> None:
    """With psycopg not importable, `check` on a PostgreSQL config exits 2 with one line naming `pip install 'cachewarden[postgresql]'`, before it reports the config valid."""
    pg_harness.configure({"user": USER})
    code = (
        "from cachewarden.operator.cli import main\n"
        f"sys.exit(main(['--config', {str(pg_harness.config_path)!r}, 'check']))"
    )
    result = _without("psycopg", code)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "(valid)" not in result.stdout
    assert "pip install 'cachewarden[postgresql]'" in result.stderr


def test_cache_from_config_names_the_extra_of_a_missing_database_driver(tmp_path: Path) -> None:
    """With pymysql not importable, Cache.from_config() on a MariaDB config raises a ConfigError naming `pip install 'cachewarden[mysql]'`."""
    config = tmp_path / "cachewarden.toml"
    config.write_text(
        '[database]\nurl = "mysql+pymysql://root@127.0.0.1:3306/test"\n'
        '[entities.user]\ntable = "users"\nkey = "id"\nttl = "1m"\n'
    )
    code = (
        "from cachewarden.cache import Cache\n"
        "from cachewarden.errors import ConfigError\n"
        "try:\n"
        f"    Cache.from_config({str(config)!r})\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    result = _without("pymysql", code)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "pip install 'cachewarden[mysql]'" in result.stdout


def test_doctor_fails_a_shard_count_that_is_not_the_recorded_one(pg_harness: Harness) -> None:
    """`doctor` fails its shard-counts check when the config says 4 shards and Redis records 2, naming both counts and the fixes (set write_behind.shards to 2, or `cachewarden reshard user 4`), and passes it once the config says 2 again."""
    h = pg_harness
    h.create_table("users")
    h.configure({"user": USER}, {"user": {"shards": 2}})
    h.cache.write("user", 1, {"name": "x", "version": 1})  # the record: 2 shards
    h.configure({"user": USER}, {"user": {"shards": 4}})
    ok, text = _doctor_lines(h)["shard counts"]
    assert not ok and "says 4, but Redis records 2 shards" in text, text
    assert "set entities.user.write_behind.shards = 2" in text, text
    assert "`cachewarden reshard user 4`" in text, text
    h.configure({"user": USER}, {"user": {"shards": 2}})
    ok, text = _doctor_lines(h)["shard counts"]
    assert ok, text


def test_dead_letter_replay_keeps_the_configured_memory_headroom(pg_harness: Harness) -> None:
    """`cachewarden dead-letters replay` refuses a letter, keeping it, while Redis uses a third of its maxmemory and [redis] memory_headroom is 0.8 (past it, though within the default 10%), and replays it under the default headroom."""
    import redis

    from cachewarden.writebehind.deadletters import count_dead
    from cachewarden.writebehind.flush import flush_shard
    from tests.servers import PrivateRedis

    h = pg_harness
    h.create_table("users", extra="CONSTRAINT no_poison CHECK (name <> 'poison')")
    with PrivateRedis(maxmemory="200mb") as server:
        roomy = {"memory_headroom": 0.8}
        h.configure({"user": USER}, {"user": {"shards": 1}}, redis_url=server.url)
        h.cache.write("user", 1, {"name": "poison", "version": 1})
        assert flush_shard(h.context, "user", 0).status == "done"
        keys = h.context.keys
        admin = redis.Redis.from_url(server.url)
        try:
            assert count_dead(admin, keys, "user") == 1
            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory", used * 3)
            h.configure(
                {"user": USER}, {"user": {"shards": 1}}, redis_url=server.url, redis_options=roomy
            )
            admin.delete(keys.memory_mark())  # (what the write above saw: look again)
            refused = cachewarden("dead-letters", "replay", "user", config=h.config_path)
            assert refused.returncode == 1, refused.stdout + refused.stderr
            assert "memory_headroom" in refused.stderr, refused.stderr
            assert count_dead(admin, keys, "user") == 1
            h.configure({"user": USER}, {"user": {"shards": 1}}, redis_url=server.url)
            admin.delete(keys.memory_mark())
            replayed = cachewarden("dead-letters", "replay", "user", config=h.config_path)
            assert replayed.returncode == 0, replayed.stdout + replayed.stderr
            assert "replayed as" in replayed.stdout
            assert count_dead(admin, keys, "user") == 0
        finally:
            admin.close()
