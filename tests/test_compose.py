"""docker-compose.yml and Dockerfile (the team installation), checked for structure.

CI cannot run Docker, so these tests read the files: the three services and how they are wired
(database URL -> postgres service, worker -> server service and its pool, health checks that
gate the start order, published ports), and that the worker image installs this repository
with the CPU pins.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _resolved(value: str) -> str:
    """Compose's ${VAR:-default} interpolation with nothing set: the defaults."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {k: _resolved(str(v)) for k, v in env.items()}


def _argv(command) -> list[str]:
    return list(command) if isinstance(command, list) else shlex.split(command)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def test_three_services(services):
    assert set(services) == {"postgres", "prefect-server", "cruijff-worker"}


def test_postgres_is_health_checked_and_not_published(services):
    pg = services["postgres"]
    assert pg["image"].split(":")[0] == "postgres" and pg["image"].endswith(":16")
    env = _env(pg)
    assert env["POSTGRES_USER"] == "prefect" and env["POSTGRES_DB"] == "prefect"
    assert env["POSTGRES_PASSWORD"]
    test = pg["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))
    assert "ports" not in pg  # only the Prefect server is reachable from outside
    assert any(v.split(":")[0] in {"prefect-db"} for v in pg["volumes"])


def test_server_uses_the_postgres_service(services):
    server = services["prefect-server"]
    assert server["image"] == "prefecthq/prefect:3.9.1-python3.11"
    argv = _argv(server["command"])
    assert argv[:3] == ["prefect", "server", "start"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    url = urlsplit(_env(server)["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    assert url.scheme == "postgresql+asyncpg"
    assert (url.hostname, url.port, url.path) == ("postgres", 5432, "/prefect")
    pg_env = _env(services["postgres"])
    assert url.username == pg_env["POSTGRES_USER"]
    assert url.password == pg_env["POSTGRES_PASSWORD"]  # the same ${POSTGRES_PASSWORD} both
    assert "4200:4200" in [str(p) for p in server["ports"]]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert server["healthcheck"]["test"]
    ui_api = urlsplit(_env(server)["PREFECT_UI_API_URL"])
    assert (ui_api.port, ui_api.path) == (4200, "/api")


def test_worker_uses_the_server_service_and_the_cruijff_pool(services):
    worker = services["cruijff-worker"]
    build = worker["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert (REPO / context).resolve() == REPO
    argv = _argv(worker["command"])
    assert argv[:3] == ["prefect", "worker", "start"]
    assert argv[argv.index("--pool") + 1] == "cruijff"
    assert argv[argv.index("--type") + 1] == "process"
    api = urlsplit(_env(worker)["PREFECT_API_URL"])
    assert (api.scheme, api.hostname, api.port, api.path) == (
        "http", "prefect-server", 4200, "/api")
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert "./experiments:/experiments" in worker["volumes"]
    assert worker.get("working_dir") == "/experiments"


def test_named_volume_is_declared(compose):
    assert "prefect-db" in compose["volumes"]


def test_comments_say_how_a_team_uses_it():
    text = (REPO / "docker-compose.yml").read_text()
    assert "docker compose up -d" in text
    assert "PREFECT_API_URL=http://<host>:4200/api cruijff deploy --pool cruijff" in text


def test_dockerfile_installs_this_repo_with_the_cpu_pins():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11")
    copied = {src.rstrip("/") for line in lines if line.startswith("COPY")
              for src in shlex.split(line)[1:-1]}
    installs = [shlex.split(line) for line in lines if line.startswith("RUN") and "pip" in line]
    assert len(installs) == 1
    argv = installs[0]
    assert argv[argv.index("install") + 1:].count("-c") == 1
    assert argv[argv.index("-c") + 1] == "constraints-cpu.txt"
    assert argv[-1] == "."  # this repository, not a released cruijff
    assert {"pyproject.toml", "constraints-cpu.txt"} <= copied
    # Everything the package is built from is in the image.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["readme"] in copied
    for folder in project["tool"]["setuptools"]["package-dir"].values():
        assert folder in copied, folder
    cmd = [line for line in lines if line.startswith("CMD")][-1]
    assert "worker" in cmd and "cruijff" in cmd
