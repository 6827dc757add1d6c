"""Thin Celery tasks, one module per job family, on top of the cachewarden core."""
