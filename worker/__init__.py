"""The cachewarden worker deployment: the Celery app and its processes.

`celery -A worker worker` runs a worker (with the flush dispatcher inside);
`celery -A worker flower` runs Flower, bound to 127.0.0.1 unless
FLOWER_ADDRESS says otherwise (set FLOWER_BASIC_AUTH=user:password too).
"""

import os
import sys

# Flower listens on every interface by default; keep it on loopback unless asked.
os.environ.setdefault("FLOWER_ADDRESS", "127.0.0.1")


def _flower_has_auth(argv: list[str]) -> bool:
    """Basic auth or OAuth, from the environment or the command line."""
    if os.environ.get("FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_AUTH"):
        return True
    return any(a.startswith(("--basic-auth", "--basic_auth", "--auth")) for a in argv)


if "flower" in sys.argv[1:] and not _flower_has_auth(sys.argv):
    print(
        "cachewarden: Flower never runs without authentication: set "
        "FLOWER_BASIC_AUTH=user:password (or FLOWER_AUTH with an OAuth provider)",
        file=sys.stderr,
    )
    raise SystemExit(2)

from worker.app import app  # noqa: E402

__all__ = ["app"]
