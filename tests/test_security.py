"""Redis over TLS for the cache and the broker, and passwords that never show."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.conftest import Harness
from tests.helpers import REPO, wait_for
from tests.servers import Certificates, PrivateRedis, free_port

USER = {"table": "users", "key": "id", "ttl": "10m"}


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
                [sys.executable, "-m", "cachewarden.cli", "--config", str(h.config_path), *verb],
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
            [sys.executable, "-m", "cachewarden.cli", "--config", str(h.config_path), "status"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1 and "wrong" not in done.stderr
        assert "invalid username-password" in done.stderr.lower() or "WRONGPASS" in done.stderr
