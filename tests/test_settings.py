"""The settings loader and duration parsing: every mistake names the file and the dotted field."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachewarden.durations import parse_duration_ms
from cachewarden.errors import CachewardenError, ConfigError
from cachewarden.settings import (
    BROKER_URL_ENV,
    CONFIG_ENV,
    DATABASE_URL_ENV,
    REDIS_URL_ENV,
    Settings,
    WriteBehindSettings,
    config_path,
    load_settings,
)
from tests.helpers import render_config

DELETE = object()


def _base() -> dict[str, dict[str, Any]]:
    return {
        "redis": {"url": "redis://127.0.0.1:6379/9", "prefix": "cw"},
        "database": {"url": "sqlite:///app.db"},
        "celery": {"queue": "cw"},
        "dispatch": {"interval": "50ms"},
        "entities.user": {"table": "users", "key": "id", "ttl": "10m"},
        "entities.user.write_behind": {"batch_size": 100, "max_pending": 1000},
    }


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (REDIS_URL_ENV, DATABASE_URL_ENV, BROKER_URL_ENV, CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def write(tmp_path: Path) -> Iterator[Any]:
    """Write a config built from the base with (table, key, value) changes; return its path."""

    def _write(*changes: tuple[str, str, Any]) -> Path:
        tables = _base()
        for table, key, value in changes:
            section = tables.setdefault(table, {})
            if value is DELETE:
                section.pop(key, None)
            else:
                section[key] = value
        path = tmp_path / "cachewarden.toml"
        path.write_text(render_config(tables))
        return path

    yield _write


def _error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value


def test_valid_file_loads_typed_values(write: Any) -> None:
    """A valid file loads into frozen settings with durations in milliseconds and defaults filled."""
    settings = load_settings(
        write(
            ("entities.user", "version_column", "version"),
            ("entities.user.write_behind", "max_delay", "250ms"),
            ("entities.user.write_behind", "lock_ttl", 30),
        )
    )
    assert isinstance(settings, Settings)
    user = settings.entities["user"]
    assert (user.name, user.table, user.key_columns, user.ttl_ms) == (
        "user",
        "users",
        ("id",),
        600_000,
    )
    assert user.version_column == "version"
    wb = user.write_behind
    assert (wb.max_delay_ms, wb.lock_ttl_ms) == (250, 30_000)
    assert (wb.batch_size, wb.max_pending) == (100, 1000)
    assert wb.shards == WriteBehindSettings().shards
    assert settings.dispatch_interval_ms == 50
    assert settings.broker_url == "redis://127.0.0.1:6379/9"
    with pytest.raises(AttributeError):
        settings.entities["user"].ttl_ms = 1  # type: ignore[misc]


ENT = "entities.user"
WB = "entities.user.write_behind"

CASES: list[tuple[str, str, Any, str, str]] = [
    (ENT, "table", DELETE, "entities.user.table", "is required"),
    (ENT, "key", DELETE, "entities.user.key", "is required"),
    (ENT, "ttl", DELETE, "entities.user.ttl", "is required"),
    (ENT, "ttl", "ten minutes", "entities.user.ttl", "is not a duration"),
    (ENT, "ttl", "10 minutes", "entities.user.ttl", "is not a duration"),
    (ENT, "ttl", "0s", "entities.user.ttl", "longer than zero"),
    (ENT, "ttl", -5, "entities.user.ttl", "cannot be negative"),
    (ENT, "ttl", True, "entities.user.ttl", "expected a duration"),
    (ENT, "ttl", math.inf, "entities.user.ttl", "finite"),
    (ENT, "ttl", math.nan, "entities.user.ttl", "finite"),
    (ENT, "table", 7, "entities.user.table", "expected a string"),
    (ENT, "version_column", 3, "entities.user.version_column", "expected a string"),
    (ENT, "max_value_bytes", 0, "entities.user.max_value_bytes", "at least 1"),
    (ENT, "colour", "red", "entities.user.colour", "unknown setting"),
    (WB, "batch_size", "10", "entities.user.write_behind.batch_size", "expected a whole number"),
    (WB, "batch_size", 2.5, "entities.user.write_behind.batch_size", "expected a whole number"),
    (WB, "shards", 0, "entities.user.write_behind.shards", "at least 1"),
    (WB, "shards", 2000, "entities.user.write_behind.shards", "1024"),
    (WB, "max_pending", 50, "entities.user.write_behind.max_pending", "at least batch_size"),
    (WB, "max_delay", "soon", "entities.user.write_behind.max_delay", "is not a duration"),
    (WB, "retry_max", "0ms", "entities.user.write_behind.retry_max", "longer than zero"),
    (WB, "flush_every", "1s", "entities.user.write_behind.flush_every", "unknown setting"),
    ("redis", "prefix", "has space", "redis.prefix", "letters, digits"),
    ("redis", "prefix", "a:b", "redis.prefix", "letters, digits"),
    ("redis", "prefix", "", "redis.prefix", "letters, digits"),
    ("redis", "url", "http://127.0.0.1:6379", "redis.url", "not a redis://"),
    ("redis", "unsafe_policy", "ignore", "redis.unsafe_policy", '"refuse" or "warn"'),
    ("redis", "port", 6379, "redis.port", "unknown setting"),
    ("database", "url", 5, "database.url", "expected a string"),
    ("database", "pool", 5, "database.pool", "unknown setting"),
    ("celery", "concurrency", "two", "celery.concurrency", "expected a whole number"),
    ("dispatch", "interval", "fast", "dispatch.interval", "is not a duration"),
    ("surprise", "x", 1, "surprise", "unknown setting"),
]


@pytest.mark.parametrize(
    ("table", "key", "value", "field", "says"), CASES, ids=[f"{c[3]}={c[2]!r}" for c in CASES]
)
def test_invalid_setting_names_file_and_field(
    write: Any, table: str, key: str, value: Any, field: str, says: str
) -> None:
    """Each invalid setting raises ConfigError whose message starts with the file and the field."""
    path = write((table, key, value))
    error = _error(path)
    assert error.source == str(path)
    assert error.field == field
    assert str(error).startswith(f"{path}: {field}: ")
    assert says in error.problem
    assert isinstance(error, CachewardenError)


def test_bad_entity_name_names_the_entity(tmp_path: Path) -> None:
    """An entity name with a dash is refused, naming entities.<name> exactly."""
    path = tmp_path / "c.toml"
    path.write_text('[entities.bad-name]\ntable = "t"\nkey = "id"\nttl = "1m"\n')
    error = _error(path)
    assert error.field == "entities.bad-name"
    assert "letters, digits and '_'" in error.problem


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("entities = 5\n", "entities"),
        ('redis = "x"\n', "redis"),
        (
            '[entities.user]\ntable = "t"\nkey = "id"\nttl = "1m"\nwrite_behind = 3\n',
            "entities.user.write_behind",
        ),
        ('[entities]\nuser = "users"\n', "entities.user"),
    ],
)
def test_scalar_where_table_expected(tmp_path: Path, text: str, field: str) -> None:
    """A scalar where a table belongs raises ConfigError naming that field."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    error = _error(path)
    assert error.field == field
    assert "expected a table" in error.problem


def test_missing_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    """A missing config file raises ConfigError naming the path and how to pass one."""
    path = tmp_path / "nope.toml"
    error = _error(path)
    assert error.source == str(path)
    assert error.field == "(file)"
    assert "not found" in error.problem and CONFIG_ENV in error.problem


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    """A directory given as the config file raises ConfigError, not an OSError."""
    error = _error(tmp_path)
    assert error.field == "(file)"
    assert "cannot be read" in error.problem


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    """A TOML syntax error raises ConfigError naming the file and the parser's line."""
    path = tmp_path / "broken.toml"
    path.write_text('[redis]\nurl = "redis://127.0.0.1:6379/0\n')
    error = _error(path)
    assert error.source == str(path)
    assert error.field == "(syntax)"
    assert "line 2" in error.problem


def test_env_overrides_win_over_the_file(write: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """CACHEWARDEN_REDIS_URL, _DATABASE_URL and _BROKER_URL replace the file's values."""
    monkeypatch.setenv(REDIS_URL_ENV, "redis://127.0.0.1:6379/5")
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    monkeypatch.setenv(BROKER_URL_ENV, "redis://127.0.0.1:6379/6")
    settings = load_settings(write(("celery", "broker_url", "redis://127.0.0.1:6379/1")))
    assert settings.redis.url == "redis://127.0.0.1:6379/5"
    assert settings.database.url == "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    assert settings.broker_url == "redis://127.0.0.1:6379/6"


def test_env_overrides_fill_absent_values(write: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment supplies URLs the file leaves out, and the broker follows the Redis URL."""
    monkeypatch.setenv(REDIS_URL_ENV, "redis://127.0.0.1:6379/3")
    monkeypatch.setenv(DATABASE_URL_ENV, "sqlite:///from-env.db")
    settings = load_settings(write(("redis", "url", DELETE), ("database", "url", DELETE)))
    assert settings.redis.url == "redis://127.0.0.1:6379/3"
    assert settings.database.url == "sqlite:///from-env.db"
    assert settings.broker_url == "redis://127.0.0.1:6379/3"


def test_empty_env_var_does_not_override(write: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty CACHEWARDEN_REDIS_URL leaves the file's URL in force."""
    monkeypatch.setenv(REDIS_URL_ENV, "")
    assert load_settings(write()).redis.url == "redis://127.0.0.1:6379/9"


def test_bad_env_redis_url_is_refused(write: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-Redis URL in CACHEWARDEN_REDIS_URL raises ConfigError on redis.url."""
    monkeypatch.setenv(REDIS_URL_ENV, "http://127.0.0.1/")
    error = _error(write())
    assert error.field == "redis.url"
    assert "http://127.0.0.1/" in error.problem


def test_config_path_prefers_explicit_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """config_path takes the explicit path, then $CACHEWARDEN_CONFIG, then the default."""
    assert config_path() == Path("config/cachewarden.toml")
    monkeypatch.setenv(CONFIG_ENV, "/etc/cw.toml")
    assert config_path() == Path("/etc/cw.toml")
    assert config_path("here.toml") == Path("here.toml")


def test_load_settings_reads_env_path(write: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_settings() without a path reads the file $CACHEWARDEN_CONFIG names."""
    path = write()
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert load_settings().source == str(path)


# -- durations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("250ms", 250),
        ("30s", 30_000),
        ("10m", 600_000),
        ("1h", 3_600_000),
        ("1d", 86_400_000),
        ("1.5s", 1_500),
        (" 10 m ", 600_000),
        (2, 2_000),
        (0.25, 250),
        ("0s", 0),
    ],
)
def test_durations_parse(text: str | int | float, ms: int) -> None:
    """Durations with units, and bare numbers as seconds, parse to whole milliseconds."""
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10",
        "10M",
        "1e3s",
        "-5s",
        "5 minutes",
        "ms",
        "1h30m",
        "9" * 400 + "s",
        True,
        -1,
        math.inf,
        -math.inf,
        math.nan,
    ],
)
def test_bad_durations_raise_value_error(text: Any) -> None:
    """A malformed, negative or non-finite duration raises ValueError saying what is accepted."""
    with pytest.raises(ValueError, match=r"duration|negative|finite"):
        parse_duration_ms(text)


@given(st.one_of(st.floats(), st.integers(), st.text(max_size=12)))
def test_duration_parsing_is_total(value: float | int | str) -> None:
    """Any number or text either parses to a non-negative int or raises ValueError."""
    try:
        ms = parse_duration_ms(value)
    except ValueError:
        return
    assert isinstance(ms, int) and ms >= 0


JOB = {"entity": "user", "every": "30s"}
WARMING_CASES: list[tuple[dict[str, Any], str, str]] = [
    ({"entity": DELETE}, "entity", "is required"),
    ({"entity": "order"}, "entity", "unknown entity 'order'"),
    ({"cron": "*/5 * * * *"}, "cron", "exactly one of cron"),
    ({"every": DELETE}, "every", "exactly one of cron"),
    ({"every": DELETE, "cron": "*/5 * * *"}, "cron", "five-field cron"),
    ({"every": DELETE, "cron": "@daily"}, "cron", "five-field cron"),
    ({"every": "500ms"}, "every", "at least 1s"),
    ({"every": DELETE, "cron": "0 3 * * *", "timezone": "Mars/Olympus"}, "timezone", "IANA"),
    ({"timezone": "UTC"}, "timezone", "cron only"),
    ({"chunk_size": 0}, "chunk_size", "at least 1"),
    ({"chunk_size": 200_000}, "chunk_size", "at most 100000"),
    ({"ttl_jitter": "150%"}, "ttl_jitter", "share"),
    ({"ttl_jitter": "lots"}, "ttl_jitter", "must be a share"),
    ({"ttl_jitter": "x%"}, "ttl_jitter", "not a share"),
    ({"enabled": "yes"}, "enabled", "true or false"),
    ({"query": "  ;  "}, "query", "is empty"),
    ({"timeout": "0s"}, "timeout", "longer than zero"),
    ({"retries": 3}, "retries", "unknown setting"),
]


@pytest.mark.parametrize(
    ("change", "key", "says"), WARMING_CASES, ids=[f"{c[1]}={c[0]}" for c in WARMING_CASES]
)
def test_an_invalid_warming_job_names_the_job_and_field(
    tmp_path: Path, change: dict[str, Any], key: str, says: str
) -> None:
    """Each invalid [warming.JOB] setting raises ConfigError naming warming.<job>.<field> and the problem."""
    job = {k: v for k, v in (JOB | change).items() if v is not DELETE}
    path = tmp_path / "c.toml"
    path.write_text(render_config(_base() | {"warming.nightly": job}))
    error = _error(path)
    assert error.field == f"warming.nightly.{key}"
    assert says in error.problem


def test_a_warming_job_loads_with_its_defaults(tmp_path: Path) -> None:
    """A job with only entity and cron gets UTC, chunks of 5,000, the entity's TTL, 10% jitter, 1 h timeout; an `every` job's misfire grace is one interval."""
    path = tmp_path / "c.toml"
    jobs = {
        "warming.nightly": {"entity": "user", "cron": "0  3 * * *"},
        "warming.often": {"entity": "user", "every": "2m", "ttl_jitter": "25%"},
        "warming.rarely": {"entity": "user", "every": "1d"},
    }
    path.write_text(render_config(_base() | jobs))
    warming = load_settings(path).warming
    nightly, often, rarely = warming["nightly"], warming["often"], warming["rarely"]
    assert (nightly.cron, nightly.timezone, nightly.chunk_size) == ("0 3 * * *", "UTC", 5000)
    assert (nightly.ttl_ms, nightly.ttl_jitter, nightly.timeout_ms) == (None, 0.1, 3_600_000)
    assert nightly.misfire_grace_ms is None and nightly.enabled
    assert (often.every_ms, often.ttl_jitter, often.misfire_grace_ms) == (120_000, 0.25, 120_000)
    assert rarely.misfire_grace_ms == 3_600_000  # one interval, at most 1 h


# (table, misspelt key, value, the valid key it stands for): misspelt in place of the
# valid one (deleted), so a required setting's "is required" would otherwise come first.
TYPOS: list[tuple[str, str, Any, str]] = [
    (ENT, "tll", "10m", "ttl"),
    (ENT, "tabel", "users", "table"),
    (ENT, "version_colum", "version", "version_column"),
    (WB, "batch_sise", 100, "batch_size"),
    ("redis", "prefx", "cw", "prefix"),
    ("database", "ulr", "sqlite:///app.db", "url"),
    ("dispatch", "intervall", "50ms", "interval"),
    ("monitoring", "prot", 9100, "port"),
    ("warming.nightly", "crn", "0 3 * * *", "cron"),
]


@pytest.mark.parametrize(("table", "typo", "value", "meant"), TYPOS, ids=[t[1] for t in TYPOS])
def test_a_misspelt_setting_names_itself_and_the_closest_valid_one(
    tmp_path: Path, table: str, typo: str, value: Any, meant: str
) -> None:
    """A misspelt setting raises ConfigError naming the misspelt key and the closest valid one, even where the valid one is required."""
    tables = _base() | {"warming.nightly": {"entity": "user", "cron": "0 3 * * *"}}
    tables.setdefault(table, {}).pop(meant, None)
    tables[table][typo] = value
    path = tmp_path / "c.toml"
    path.write_text(render_config(tables))
    error = _error(path)
    assert error.field == f"{table}.{typo}"
    assert f"did you mean {meant!r}" in error.problem


def test_a_cron_field_out_of_range_is_a_config_error_at_load(tmp_path: Path) -> None:
    """A cron expression with a field out of range fails load_settings naming the job's cron field and the value."""
    path = tmp_path / "c.toml"
    path.write_text(
        render_config(_base() | {"warming.late": {"entity": "user", "cron": "0 25 * * *"}})
    )
    error = _error(path)
    assert error.field == "warming.late.cron" and "'0 25 * * *'" in error.problem


def test_settings_load_without_apscheduler(tmp_path: Path) -> None:
    """With APScheduler not importable, the library imports and a config with a cron job loads."""
    import subprocess
    import sys

    path = tmp_path / "c.toml"
    path.write_text(render_config(_base() | {"warming.n": {"entity": "user", "cron": "0 3 * * *"}}))
    code = (
        "import sys; sys.modules['apscheduler'] = None\n"
        "import cachewarden.cache\n"
        "from cachewarden.settings import load_settings\n"
        f"print(load_settings({str(path)!r}).job('n').cron)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0 3 * * *"


# -- Sentinel and durability (issue 20) ----------------------------------------------


def test_sentinels_and_service_name_the_primary_and_the_broker(write: Any) -> None:
    """A sentinels list with a service, or the same as one redis+sentinel:// URL, names the sentinels, the service and the data nodes' password and database, and the default broker becomes kombu's sentinel:// URLs with that service."""
    listed = load_settings(
        write(
            ("redis", "url", "redis://:secret@ignored/3"),
            ("redis", "sentinels", ["10.0.0.1:26379", "10.0.0.2:26380"]),
            ("redis", "service", "cw-primary"),
        )
    )
    from_url = load_settings(
        write(
            ("redis", "url", "redis+sentinel://:secret@10.0.0.1:26379,10.0.0.2:26380/cw-primary/3")
        )
    )
    for settings in (listed, from_url):
        redis = settings.redis
        assert redis.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
        assert redis.service == "cw-primary"
        assert settings.broker_url == (
            "sentinel://:secret@10.0.0.1:26379/3;sentinel://:secret@10.0.0.2:26380/3"
        )
        assert settings.broker_service == "cw-primary"
        assert "secret" not in redis.shown and "cw-primary" in redis.shown


@pytest.mark.parametrize(
    ("changes", "field", "problem"),
    [
        ([("redis", "sentinels", ["10.0.0.1"])], "redis.sentinels", "is not host:port"),
        ([("redis", "sentinels", ["10.0.0.1:26379"])], "redis.service", "is required"),
        ([("redis", "service", "x")], "redis.service", "sentinels is not"),
        ([("redis", "url", "redis+sentinel://h:1")], "redis.url", "a Sentinel URL is"),
        ([("redis", "durability", "disk")], "redis.durability", "must be one of"),
        (
            [("redis", "durability", "replicas"), ("redis", "replicas", 0)],
            "redis.replicas",
            "at least 1",
        ),
        (
            [("entities.user", "durability", "replicas")],
            "entities.user.durability",
            "needs [redis] replicas",
        ),
        (
            [("celery", "broker_url", "sentinel://h:26379")],
            "celery.broker_service",
            "is required",
        ),
    ],
)
def test_sentinel_and_durability_mistakes_name_the_field(
    write: Any, changes: list[tuple[str, str, Any]], field: str, problem: str
) -> None:
    """Each Sentinel or durability mistake is a ConfigError naming its field and what it needs."""
    error = _error(write(*changes))
    assert error.field == field and problem in error.problem


def test_durability_defaults_and_per_entity_override(write: Any) -> None:
    """durability = "replicas" defaults to one replica; an entity's own durability wins over [redis]'s."""
    settings = load_settings(
        write(("redis", "durability", "replicas"), ("entities.user", "durability", "primary"))
    )
    assert settings.redis.replicas == 1
    user = settings.entities["user"]
    assert settings.durability_of(user).mode == "primary"
    assert settings.durability_of(replace(user, durability=None)).mode == "replicas"
