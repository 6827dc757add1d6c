"""The files in ops/: each one exercised where a test can reach it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cachewarden.settings import load_settings
from cachewarden.warming.schedule import check_jobs
from tests.helpers import REPO

OPS = REPO / "ops"
METRIC = re.compile(r"\b(cachewarden_[a-z_]+)")


def served_metrics() -> set[str]:
    """Every sample name the exporter can serve: its meters and its Redis-read families."""
    from prometheus_client import CollectorRegistry

    from cachewarden.operator import exporter

    meters = exporter.Meters(CollectorRegistry())
    names: set[str] = set()
    for value in vars(meters).values():
        for metric in value.describe():
            kind, base = metric.type, metric.name
            if kind == "counter":
                names.add(f"{base}_total")
            elif kind == "histogram":
                names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
            else:
                names.add(base)
    redis_families = {
        "pending_writes",
        "lag_seconds",
        "dead_letters",
        "writes_enqueued_total",
        "loads_total",
        "reads_total",
        "stampede_waits_total",
    }
    source = Path(exporter.__file__).read_text()
    for family in redis_families:
        assert f'f"{{PREFIX}}_{family.removesuffix("_total")}"' in source, family
    return names | {f"cachewarden_{f}" for f in redis_families}


def test_promtool_accepts_the_alert_rules_and_the_scrape_config() -> None:
    """`promtool check rules` passes on ops/prometheus/alerts.yml, with the four alerts, and `promtool check config` on prometheus.yml."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (.ci/run does)"
    rules = subprocess.run(
        [promtool, "check", "rules", str(OPS / "prometheus/alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 4 rules found" in rules.stdout
    config = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(OPS / "prometheus/prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert config.returncode == 0, config.stdout + config.stderr
    names = {
        r["alert"]
        for g in yaml.safe_load((OPS / "prometheus/alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    assert names == {
        "CachewardenNoWorkers",
        "CachewardenLagHigh",
        "CachewardenDeadLettersGrowing",
        "CachewardenFlushFailures",
    }


def test_the_dashboard_alerts_and_keda_name_only_metrics_the_exporter_serves() -> None:
    """Every cachewarden_* name in the Grafana dashboard, the alert rules and the KEDA trigger is one the exporter serves, and the dashboard uses most of what it serves."""
    served = served_metrics()
    dashboard = json.loads((OPS / "grafana/cachewarden.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert used and used <= served, used - served
    for path in ("prometheus/alerts.yml", "keda/scaledobject.yaml"):
        named = set(METRIC.findall((OPS / path).read_text()))
        assert named and named <= served, (path, named - served)
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in served}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert bases == shown, bases - shown


def test_compose_runs_every_service_with_aof_and_flower_behind_auth() -> None:
    """ops/compose.yaml runs Redis with AOF and noeviction, PostgreSQL, worker, scheduler, Flower (auth required), Prometheus with the rules, and Grafana with the dashboard, from the Dockerfile."""
    compose = yaml.safe_load((OPS / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {
        "redis",
        "postgres",
        "worker",
        "scheduler",
        "flower",
        "prometheus",
        "grafana",
    }
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    for name in ("worker", "scheduler", "flower"):
        assert services[name]["build"]["dockerfile"] == "ops/docker/Dockerfile"
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert ":?" in services["flower"]["environment"]["FLOWER_BASIC_AUTH"]  # required
    mounts = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for file in ("prometheus.yml", "alerts.yml", "cachewarden.json", "provisioning"):
        assert file in mounts
    for mount in mounts.split():
        local = mount.split(":")[0]
        assert (OPS / local).exists(), local
    dockerfile = (OPS / "docker/Dockerfile").read_text()
    assert 'CMD ["cachewarden", "worker"]' in dockerfile and "[worker," in dockerfile


def test_compose_holds_no_database_password_and_requires_one() -> None:
    """ops/compose.yaml sets no PostgreSQL password of its own: the server and the workers' database URL take POSTGRES_PASSWORD from the environment (or ops/.env), required, with no default."""
    text = (OPS / "compose.yaml").read_text()
    services = yaml.safe_load(text)["services"]
    required = re.compile(r"^\$\{POSTGRES_PASSWORD:\?[^}]+\}$")
    assert required.match(services["postgres"]["environment"]["POSTGRES_PASSWORD"])
    url = services["worker"]["environment"]["CACHEWARDEN_DATABASE_URL"]
    secret = url.split("//", 1)[1].split("@", 1)[0].split(":", 1)[1]
    assert required.match(secret), url
    for name in ("scheduler", "flower"):
        assert services[name]["environment"]["CACHEWARDEN_DATABASE_URL"] == url
    # Every secret compose interpolates is required (`:?`): none falls back to a default.
    assert not re.search(r"\$\{[A-Z_]*(PASSWORD|AUTH)[A-Z_]*(:?-)", text)


def test_the_production_config_loads_and_its_jobs_schedule() -> None:
    """ops/config/production.toml is a valid config: it loads, its warming jobs' schedules build, and it turns the metrics port on."""
    settings = load_settings(OPS / "config/production.toml")
    assert check_jobs(settings).keys() == {"users_nightly"}
    assert settings.monitoring.port == 9808


def test_flower_refuses_to_start_without_authentication(tmp_path: Path) -> None:
    """`celery -A worker flower` with no FLOWER_BASIC_AUTH (nor OAuth) exits 2 saying how to set it, before listening."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env["CACHEWARDEN_CONFIG"] = str(REPO / "config/cachewarden.toml")
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "flower", "--port=1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "FLOWER_BASIC_AUTH" in done.stderr, done.stderr


def test_the_systemd_units_run_commands_that_exist() -> None:
    """Each unit's ExecStart runs a command of the installed package (cachewarden worker, scheduler, flower: no checkout needed) and reads the env file the example documents."""
    units: dict[str, Any] = {p.name: p.read_text() for p in (OPS / "systemd").glob("*.service")}
    assert set(units) == {
        "cachewarden-worker@.service",
        "cachewarden-scheduler.service",
        "cachewarden-flower.service",
    }
    for name, text in units.items():
        [start] = [line for line in text.splitlines() if line.startswith("ExecStart=")]
        assert re.search(r"/bin/cachewarden (worker|scheduler|flower)\b", start), name
        assert "EnvironmentFile=" in text, name
    env = (OPS / "systemd/env.example").read_text()
    assert "CACHEWARDEN_REDIS_URL=" in env and "CACHEWARDEN_DATABASE_URL=" in env


def test_the_sentinel_option_adds_a_replica_and_three_sentinels_and_points_every_process_at_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ops/compose.ha.yaml adds a replica and three sentinels (quorum 2, from ops/redis/sentinel.conf), sets min-replicas-to-write on both data nodes, and gives the worker, scheduler and Flower a redis+sentinel:// URL that cachewarden loads as those sentinels and that service."""
    from cachewarden.settings import load_settings

    ha = yaml.safe_load((OPS / "compose.ha.yaml").read_text())["services"]
    assert {"redis-replica", "sentinel1", "sentinel2", "sentinel3"} <= set(ha)
    for name in ("redis", "redis-replica"):
        assert "--min-replicas-to-write 1" in " ".join(ha[name]["command"])
    assert "--replicaof redis 6379" in " ".join(ha["redis-replica"]["command"])
    conf = (OPS / "redis/sentinel.conf").read_text()
    assert "sentinel monitor cachewarden redis 6379 2" in conf
    urls = {
        ha[name]["environment"]["CACHEWARDEN_REDIS_URL"]
        for name in ("worker", "scheduler", "flower")
    }
    assert len(urls) == 1
    monkeypatch.setenv("CACHEWARDEN_REDIS_URL", urls.pop())
    settings = load_settings(OPS / "config/production.toml")
    assert settings.redis.service == "cachewarden"
    assert [host for host, _ in settings.redis.sentinels] == ["sentinel1", "sentinel2", "sentinel3"]
    assert settings.broker_url.startswith("sentinel://sentinel1:26379/0;")
