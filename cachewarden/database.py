"""SQLAlchemy engines, built after fork by this factory, never at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event

from cachewarden.errors import BackendUnavailable, ConfigError
from cachewarden.settings import DatabaseSettings

# The extra that installs each driver SQLAlchemy may ask for (its module's top name).
_EXTRAS = {"psycopg": "postgresql", "psycopg2": "postgresql", "pymysql": "mysql"}


def make_engine(settings: DatabaseSettings, **overrides: Any) -> Engine:
    """An engine for `settings.url` tuned for short batched transactions."""
    url = settings.url
    options: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        options["connect_args"] = {"timeout": 30}
    else:
        options.update(pool_size=2, max_overflow=2, pool_recycle=1800)
    options.update(overrides)
    try:
        engine = create_engine(url, **options)
    except ImportError as exc:
        raise _missing_driver(url, exc) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        database = engine.url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            # A file in a directory not made yet (the default's .cachewarden/demo.db).
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    return engine


def _missing_driver(url: str, exc: ImportError) -> ConfigError:
    """A ConfigError naming the driver the URL needs and the extra that installs it."""
    module = (exc.name or "").split(".")[0] or "its driver"
    extra = _EXTRAS.get(module)
    install = f"pip install 'cachewarden[{extra}]'" if extra else f"install the {module} package"
    return ConfigError(
        "database.url",
        url.split("://", 1)[0],
        f"the database driver {module!r} is not installed ({exc}): {install}, or pick "
        "another driver in the URL's scheme",
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def describe(engine: Engine) -> str:
    """The engine's URL with the password hidden."""
    return engine.url.render_as_string(hide_password=True)


def unavailable(engine: Engine, exc: BaseException) -> BackendUnavailable:
    """A BackendUnavailable naming the database and the driver's complaint."""
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return BackendUnavailable(f"database {describe(engine)} is unavailable: {first_line}")
