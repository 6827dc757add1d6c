"""The cachewarden worker deployment: the Celery app and its processes.

Installed as `cachewarden.worker` (the wheel maps this folder there): `celery -A
cachewarden.worker worker` runs a worker (with the flush dispatcher inside) from any
directory, and `celery -A cachewarden.worker flower` runs Flower, bound to 127.0.0.1
unless FLOWER_ADDRESS says otherwise (set FLOWER_BASIC_AUTH=user:password too). From
this repository's root, `celery -A worker ...` runs the same files.
"""

import importlib
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
