"""The cachewarden worker deployment: the Celery app and its processes."""

from worker.app import app

__all__ = ["app"]
