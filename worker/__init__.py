"""The cachewarden worker deployment: the Celery app and its processes.

`celery -A worker worker` runs a worker (with the flush dispatcher inside);
`celery -A worker flower` runs Flower, bound to 127.0.0.1 unless
FLOWER_ADDRESS says otherwise (set FLOWER_BASIC_AUTH=user:password too).
"""

import os

# Flower listens on every interface by default; keep it on loopback unless asked.
os.environ.setdefault("FLOWER_ADDRESS", "127.0.0.1")

from worker.app import app

__all__ = ["app"]
