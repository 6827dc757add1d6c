"""Redis over TLS for the cache and the broker, and passwords that never show."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from cachewarden.errors import UnsafePath
from cachewarden.operator import exporter, heartbeat
from cachewarden.settings import load_settings
from tests.conftest import Harness
from tests.helpers import REPO, render_config, wait_for
from tests.servers import Certificates, PrivateRedis, free_port

USER = {"table": "users", "key": "id", "ttl": "10m"}


def _config(tmp_path: Path, prefix: str = "cw", directory: Path | None = None) -> Path:
    """A config file with no server in it (none is contacted), its [monitoring] dir given."""
    tables = {
        "redis": {"url": "redis://127.0.0.1:1/0", "prefix": prefix},
        "database": {"url": "sqlite://"},
        "entities.user": USER,
    }
    if directory is not None:
        tables["monitoring"] = {"dir": str(directory)}
    path = tmp_path / f"{prefix}.toml"
    path.write_text(render_config(tables))
    return path


def test_writes_flow_through_a_tls_only_redis_for_the_cache_and_the_broker(
    pg_harness: Harness, tmp_path: Path
) -> None:
    """A private redis-server listening on TLS only, requiring client certificates (a CA made by the test): a worker takes its flush tasks through it as broker, the write lands in the database, and get() reads it back."""
    h = pg_harness
    h.create_table("users", version=False)
    certs = Certificates(tmp_path / "tls")
    with PrivateRedis(tls=certs) as server:
        assert server.url.startswith("rediss://")
        tls = {
            "tls_ca_file": str(certs.ca),
            "tls_cert_file": str(certs.client_cert),
            "tls_key_file": str(certs.client_key),
        }
        settings = h.configure({"user": USER}, redis_url=server.url, redis_options=tls)
        assert settings.broker_url.startswith("rediss://")
        worker = h.worker(concurrency=1)
        h.cache.write("user", 7, {"name": "over tls"})
        wait_for(lambda: h.count("users") == 1, 20, what="the write to land through TLS")
        assert h.rows("users")[7]["name"] == "over tls"
        assert (h.cache.get("user", 7) or {}).get("name") == "over tls"
        assert "cachewarden.flush" in worker.output()
        h._close_clients()
        for w in h.workers:
            w.kill()
        plain = subprocess.run(
            ["redis-cli", "-p", str(server.port), "PING"], capture_output=True, text=True
        )
        assert "PONG" not in plain.stdout  # no plain-text way in


def test_a_redis_password_shows_in_no_log_status_check_doctor_or_metric(
    pg_harness: Harness, tmp_path: Path
) -> None:
    """With passwords in the Redis and database URLs, neither appears in the worker's log, in `status`, `check` or `doctor` output (text or JSON), or in the metrics; the masked URL does."""
    h = pg_harness
    h.create_table("users", version=False)
    secret, db_secret = "s3cr3t-redis-pw", "s3cr3t-db-pw"
    db_url = h.db_url.replace("postgres@", f"postgres:{db_secret}@", 1)
    port = free_port()
    with PrivateRedis(password=secret) as server:
        h.configure(
            {"user": USER},
            redis_url=server.url,
            db_url=db_url,
            monitoring={"port": port, "dir": str(tmp_path / "mon")},
        )
        worker = h.worker(concurrency=1)
        h.cache.write("user", 1, {"name": "x"})
        wait_for(lambda: h.count("users") == 1, 20, what="the write to land")
        outputs = {}
        for verb in (["status"], ["status", "--json"], ["check"], ["doctor"], ["doctor", "--json"]):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "cachewarden.operator.cli",
                    "--config",
                    str(h.config_path),
                    *verb,
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
            outputs[" ".join(verb)] = done.stdout + done.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            outputs["metrics"] = r.read().decode()
        outputs["worker log"] = worker.output()
    assert "127.0.0.1" in outputs["check"] and ":***@" in outputs["check"]
    assert json.loads(outputs["status --json"].splitlines()[-1])["entities"]["user"]
    for name, text in outputs.items():
        assert secret not in text, name
        assert db_secret not in text, name


def test_an_acl_user_works_for_the_cache_and_the_broker(pg_harness: Harness) -> None:
    """A Redis whose default user is off and whose only user is an ACL user (user:password in the URL): writes are taken, flushed through a worker that uses it as broker, and read back; a wrong password is refused with a clear error."""
    h = pg_harness
    h.create_table("users", version=False)
    with PrivateRedis(password="acl-pw", username="cachewarden") as server:
        assert server.url.startswith("redis://cachewarden:acl-pw@")
        h.configure({"user": USER}, redis_url=server.url)
        h.worker(concurrency=1)
        h.cache.write("user", 3, {"name": "acl"})
        wait_for(lambda: h.count("users") == 1, 20, what="the write to land")
        assert (h.cache.get("user", 3) or {}).get("name") == "acl"
        wrong = server.url.replace("acl-pw", "wrong")
        h.configure({"user": USER}, redis_url=wrong)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "cachewarden.operator.cli",
                "--config",
                str(h.config_path),
                "status",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1 and "wrong" not in done.stderr
        assert "invalid username-password" in done.stderr.lower() or "WRONGPASS" in done.stderr


def _other_users_dir(tmp_path: Path) -> Path:
    """A directory this user does not own (root's `/` for anyone else; as root, one given
    to `nobody`)."""
    if os.geteuid() != 0:
        return Path("/")
    other = tmp_path / "others"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    return other


def test_the_runtime_directory_is_private_or_refused(tmp_path: Path) -> None:
    """The default runtime directory is per user and made 0700 by the first heartbeat; a directory with a looser mode, another owner, or a symbolic link in its place is refused by heartbeats and the exporter with an error naming the path and the fix."""
    settings = load_settings(_config(tmp_path, prefix="cwsec"))
    made = Path(settings.monitoring.directory)
    assert made == Path(tempfile.gettempdir()) / f"cachewarden-{os.geteuid()}-cwsec"
    shutil.rmtree(made, ignore_errors=True)
    try:
        heartbeat.beat(str(made), "w1@host", "consumer")
        info = made.lstat()
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
    finally:
        shutil.rmtree(made, ignore_errors=True)
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    link = tmp_path / "link"
    (tmp_path / "private").mkdir(mode=0o700)
    link.symlink_to(tmp_path / "private", target_is_directory=True)
    assert link.resolve() == tmp_path / "private"  # following it, a beat would land there
    refusals = {
        loose: f"has mode 755, open to other users; run `chmod 700 {loose}`",
        _other_users_dir(tmp_path): "not by this user",
        link: "is a symbolic link",
    }
    for directory, problem in refusals.items():
        with pytest.raises(UnsafePath, match=re.escape(f"{directory}: ")) as refused:
            heartbeat.beat(str(directory), "w1@host", "consumer")
        assert problem in str(refused.value)
        settings = load_settings(_config(tmp_path, directory=directory))
        with pytest.raises(UnsafePath, match=re.escape(problem)):
            exporter.prepare(settings)
    assert not (tmp_path / "private" / "w1@host.consumer").exists()  # nothing went through


def test_heartbeat_files_are_never_written_through_a_symbolic_link(tmp_path: Path) -> None:
    """A symbolic link planted where a heartbeat or ready file goes is replaced by the file itself; the link's target is neither touched nor written."""
    directory = tmp_path / "beats"
    directory.mkdir(mode=0o700)
    target = tmp_path / "victim"
    target.write_text("precious\n")
    os.utime(target, (0, 0))
    for kind in ("consumer", "ready"):
        heartbeat.node_file(str(directory), "w1@host", kind).symlink_to(target)
    planted = heartbeat.node_file(str(directory), "w1@host", "consumer")
    assert planted.resolve() == target and os.access(planted, os.W_OK)  # following would write it
    heartbeat.beat(str(directory), "w1@host", "consumer")
    heartbeat.mark_ready(str(directory), "w1@host", ["q1", "q2"])
    assert target.read_text() == "precious\n" and target.stat().st_mtime == 0
    for kind in ("consumer", "ready"):
        path = heartbeat.node_file(str(directory), "w1@host", kind)
        info = path.lstat()
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    health = heartbeat.health(str(directory), "w1@host")
    assert health.queues == ["q1", "q2"] and health.ages_s["consumer"] is not None
