"""The cachewarden worker deployment: the Celery app and its processes.

Installed as `cachewarden.worker` (the wheel maps this folder there): `celery -A
cachewarden.worker worker` runs a worker (with the flush dispatcher inside) from any
directory, and `celery -A cachewarden.worker flower` runs Flower, bound to 127.0.0.1
unless FLOWER_ADDRESS says otherwise (set FLOWER_BASIC_AUTH=user:password too). From
this repository's root, `celery -A worker ...` runs the same files.
"""

import importlib


def __getattr__(name: str) -> object:
    """`app`, built on first use: the Celery app reads the config when it is built, so
    importing the package for its bootsteps or tasks (an application's own Celery app
    does, through cachewarden.celery.install) reads nothing."""
    if name != "app":
        raise AttributeError(name)
    module = importlib.import_module(f"{__name__}.app")
    globals()["app"] = module.app  # the app, not the submodule of the same name
    return module.app


__all__ = ["app"]
