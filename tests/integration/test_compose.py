"""The top-level docker-compose.yml is valid for Debian's docker-compose 1.29 (CI installs the
`docker-compose` package) and wires the stack as documented: Postgres, Redis, an SMTP catcher,
a one-shot `db init`, the poller and the workers sharing one environment.

No Docker engine is needed: `docker-compose config` only parses, interpolates and validates.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"

DATABASE_URL = "postgresql://postgres:postgres@postgres:5432/outbox"
REDIS_URL = "redis://redis:6379/0"
REQUIRED_SERVICES = {"postgres", "redis", "smtp", "migrate", "poller", "worker"}
# Optional (profile `dashboards`): Prometheus scraping the poller and workers, Grafana
# reading Prometheus and the Postgres views, and the one-shot that makes Grafana's login role.
DASHBOARD_SERVICES = {"prometheus", "grafana", "dashboard-role"}
APP_SERVICES = ("migrate", "poller", "worker")


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is not on PATH: install Debian's docker-compose package "
            "(`apt-get install docker-compose`, 1.29.x; CI installs it) to validate "
            "docker-compose.yml",
            pytrace=False,
        )
    return exe


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    # A minimal environment, so a developer's COMPOSE_*, DOCKER_* or interpolated
    # variables can't change what is validated: the file's own defaults apply.
    env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    return subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE_FILE), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _yaml_to_data(text: str) -> Any:
    """Parse `docker-compose config` output. PyYAML is not a dependency of this project; if
    it is missing, borrow the interpreter docker-compose itself runs on (Debian's package
    is a Python script that depends on python3-yaml)."""
    try:
        import yaml
    except ImportError:
        pass
    else:
        return yaml.safe_load(text)

    exe = _docker_compose()
    with open(exe, "rb") as f:
        first = f.readline().decode("utf-8", "replace").strip()
    if not first.startswith("#!"):
        pytest.fail(
            f"cannot parse `docker-compose config` output: PyYAML is not installed and "
            f"{exe} is not a Python script (install Debian's docker-compose package)",
            pytrace=False,
        )
    interpreter = shlex.split(first[2:])
    proc = subprocess.run(
        [
            *interpreter,
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"cannot parse `docker-compose config` output with {interpreter}: {proc.stderr.strip()}",
            pytrace=False,
        )
    return json.loads(proc.stdout)


# Called from inside each test rather than from a fixture, so a missing docker-compose is a
# test failure (FAILED, with the message above), not a fixture error.
@functools.cache
def _services() -> dict[str, dict[str, Any]]:
    proc = _compose("config")
    assert proc.returncode == 0, proc.stderr
    config = _yaml_to_data(proc.stdout)
    return config["services"]


def _environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {key: value for key, _, value in pairs}
    return {key: None if value is None else str(value) for key, value in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def test_compose_file_is_valid_without_warnings() -> None:
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    proc = _compose("config", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"docker-compose complained:\n{proc.stderr}"
    assert proc.stdout.strip() == ""


def test_services_are_all_there() -> None:
    proc = _compose("config", "--services")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""
    names = set(proc.stdout.split())
    assert names >= REQUIRED_SERVICES, f"missing: {sorted(REQUIRED_SERVICES - names)}"


def test_poller_and_worker_run_their_commands() -> None:
    services = _services()
    poller, worker = _command(services["poller"]), _command(services["worker"])
    assert poller[0] == "poll"
    assert worker[0] == "worker"
    assert "--metrics-port" in poller and "--metrics-port" in worker
    for name in ("poller", "worker"):
        assert services[name].get("restart") in ("always", "unless-stopped", "on-failure")
        # Metrics are for Prometheus inside the compose network, never published on the host.
        assert not services[name].get("ports")


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_share_the_outbox_environment(name: str) -> None:
    env = _environment(_services()[name])
    assert env.get("OUTBOX_DATABASE_URL") == DATABASE_URL
    assert env.get("OUTBOX_REDIS_URL") == REDIS_URL


def test_urls_point_at_the_services_in_this_file() -> None:
    services = _services()
    db = urlsplit(DATABASE_URL)
    pg_env = _environment(services["postgres"])
    assert db.hostname in services
    assert pg_env.get("POSTGRES_DB") == db.path.lstrip("/")
    assert pg_env.get("POSTGRES_PASSWORD") == db.password
    assert urlsplit(REDIS_URL).hostname in services


def test_schema_is_applied_before_the_poller_and_workers_start() -> None:
    services = _services()
    assert _command(services["migrate"]) == ["db", "init"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name in ("poller", "worker"):
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully"


def test_redis_keeps_keys_across_restarts() -> None:
    command = _command(_services()["redis"])
    assert "--appendonly" in command
    assert command[command.index("--appendonly") + 1] == "yes"


# -- dashboards (Prometheus + Grafana) -----------------------------------------------------


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the bind mounts of a service."""
    mounts = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume.get("target", "")
        else:
            source, target = volume.split(":")[:2]
        if source.startswith("/"):
            mounts[target] = Path(source)
    return mounts


def _flag(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def test_dashboard_services_are_optional() -> None:
    services = _services()
    assert set(services) >= DASHBOARD_SERVICES
    for name in DASHBOARD_SERVICES:
        assert services[name].get("profiles") == ["dashboards"]
    for name in REQUIRED_SERVICES:
        assert not services[name].get("profiles")


def test_prometheus_scrapes_the_poller_and_every_worker() -> None:
    services = _services()
    config_file = _mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"]
    assert config_file.is_file() and config_file.resolve().is_relative_to(REPO)
    config = _yaml_to_data(config_file.read_text())
    targets = {
        (name, sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    for name in ("poller", "worker"):
        command = _command(services[name])
        # listening on every interface of the container, so another container can scrape it
        assert _flag(command, "--metrics-host") == "0.0.0.0"
        assert (name, int(_flag(command, "--metrics-port") or 0)) in targets


def test_grafana_is_provisioned_with_both_datasources_and_the_dashboard() -> None:
    services = _services()
    grafana = services["grafana"]
    mounts = _mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    dashboards = mounts["/etc/grafana/dashboards"]
    env = _environment(grafana)
    datasources = {
        ds["uid"]: ds
        for f in sorted((provisioning / "datasources").glob("*.yaml"))
        for ds in _yaml_to_data(f.read_text())["datasources"]
    }
    prometheus = datasources["outbox-prometheus"]
    assert prometheus["type"] == "prometheus"
    assert urlsplit(prometheus["url"]).hostname in services
    postgres = datasources["outbox-postgres"]
    assert postgres["type"] == "grafana-postgresql-datasource"
    assert postgres["url"].split(":")[0] in services
    assert postgres["jsonData"]["database"] == urlsplit(DATABASE_URL).path.lstrip("/")
    password_var = postgres["secureJsonData"]["password"].lstrip("$").strip("{}")
    assert env.get(password_var)  # Grafana expands $VAR from its environment
    # the login role Grafana uses is made by the one-shot service, granted outbox_dashboard
    role_script = " ".join(_command(services["dashboard-role"]))
    assert f"GRANT outbox_dashboard TO {postgres['user']}" in role_script
    assert grafana["depends_on"]["dashboard-role"]["condition"] == "service_completed_successfully"
    [provider] = _yaml_to_data((provisioning / "dashboards" / "outbox.yaml").read_text())["providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    dashboard = json.loads((dashboards / "outbox.json").read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"] if p.get("datasource")}
    assert used == set(datasources)


def _seconds(value: Any) -> float:
    """A compose duration ("30s", "1m30s"; `config` may print it back as given)."""
    import re

    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(value))
    assert parts, f"unreadable duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_grace_period_outlasts_the_shutdown_deadline() -> None:
    """Compose SIGTERMs the poller and workers, then kills them after stop_grace_period: the
    processes must have drained (OUTBOX_SHUTDOWN_SECONDS) before that."""
    from outbox.config import Config

    services = _services()
    for name in ("poller", "worker"):
        env = _environment(services[name])
        shutdown = float(env.get("OUTBOX_SHUTDOWN_SECONDS", Config.model_fields["shutdown_seconds"].default))
        grace = _seconds(services[name].get("stop_grace_period", "10s"))
        assert grace == 30 and shutdown + 3 <= grace, (name, grace, shutdown)


def test_web_console_serves_on_this_host_only_after_the_schema() -> None:
    web = _services()["web"]
    assert _command(web)[:1] == ["web"] and "0.0.0.0" in _command(web)
    assert [p["host_ip"] if isinstance(p, dict) else p.split(":")[0] for p in web["ports"]] == ["127.0.0.1"]
    assert web["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    env = _environment(web)
    assert env["OUTBOX_DATABASE_URL"] == DATABASE_URL and "OUTBOX_WEB_SECRET" in env
