"""The managed Prefect server on a real PostgreSQL (`bash scripts/postgres/start.sh`).

Each run of this module works in a database of its own (`prefect_test_<random>`, owned by a role
with a random password), dropped at the end. Skipped without PostgreSQL unless
CRUIJFF_REQUIRE_POSTGRES=1 (CI), then failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cruijff.flows.server import start_server, stop_server
from postgres_support import Database, fresh_database, query, require_postgres

from cruijff.errors import CruijffError

REPO = Path(__file__).resolve().parent.parent

FLOW = """
from prefect import flow, task

@task
def double(x: int) -> int:
    return 2 * x

@flow(name="cruijff-postgres-probe")
def probe(x: int) -> int:
    return double(x)

state = probe(21, return_state=True)
print(state.state_details.flow_run_id, state.result())
"""


def _clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment without any Prefect or cruijff configuration of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CRUIJFF_"))}
    env.update(PREFECT_HOME=str(tmp / "prefect-client"), DO_NOT_TRACK="1", NO_COLOR="1",
               COLUMNS="200", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def db() -> Database:
    require_postgres()
    with fresh_database() as database:
        yield database


@pytest.fixture(scope="module")
def pg_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cruijff-pg-home")


@pytest.fixture(scope="module")
def pg_server(db, pg_home):
    """One managed server on the test database for the module, always stopped at the end."""
    started = time.monotonic()
    try:
        info = start_server(pg_home, database_url=db.url)
        print(f"Prefect server on PostgreSQL (fresh database) up in "
              f"{time.monotonic() - started:.1f} s")
        yield info
    finally:
        stop_server(pg_home)


def _flow_run_rows(db: Database, flow_run_id: str, timeout: float = 15) -> list[tuple]:
    sql = ("SELECT f.name, fr.state_type::text FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
           "WHERE fr.id = $1::uuid")
    deadline = time.monotonic() + timeout
    while True:
        rows = query(db.url, sql, flow_run_id)
        if (rows and rows[0][1] == "COMPLETED") or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_server_runs_a_flow_into_postgres(db, pg_home, pg_server, tmp_path):
    assert pg_server.managed and pg_server.pid
    assert pg_server.database == db.url.replace(db.password, "***")
    assert not (pg_home / "prefect" / "prefect.db").exists()  # no SQLite on the side
    proc = subprocess.run(
        [sys.executable, "-c", FLOW], cwd=tmp_path, capture_output=True, text=True, timeout=180,
        env=_clean_env(tmp_path, PREFECT_API_URL=pg_server.url,
                       PREFECT_SERVER_EPHEMERAL_ENABLED="false"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    flow_run_id, result = proc.stdout.split()[-2:]
    assert result == "42"
    # The row is in PostgreSQL, read there directly, not through the Prefect API.
    assert _flow_run_rows(db, flow_run_id) == [("cruijff-postgres-probe", "COMPLETED")]


def test_password_is_never_written(db, pg_home, pg_server):
    sdir = pg_home / "prefect"
    state = json.loads((sdir / "server.json").read_text())
    assert state["database"] == db.url.replace(db.password, "***")
    for path in sdir.rglob("*"):
        if path.is_file():
            assert db.password not in path.read_text(errors="replace"), path


def test_a_rejected_password_is_a_clear_error_that_does_not_leak(db, tmp_path):
    wrong = f"wrong-{db.password}"
    url = db.url.replace(db.password, wrong)
    with pytest.raises(CruijffError) as err:
        start_server(tmp_path, database_url=url, timeout=60)
    message = str(err.value)
    assert "password authentication failed" in message
    assert wrong not in message and db.password not in message
    sdir = tmp_path / "prefect"
    assert not (sdir / "server.json").exists()
    log = (sdir / "server.log").read_text()
    assert "password authentication failed" in log
    assert wrong not in log and db.password not in log


def _cli(home: Path, tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cruijff", *args], cwd=tmp, capture_output=True, text=True,
        timeout=180, env=_clean_env(tmp, CRUIJFF_HOME=str(home), **env),
    )


def test_cli_server_start_with_database_url(db, tmp_path):
    home = tmp_path / "home"
    try:
        proc = _cli(home, tmp_path, "server", "start", "--database-url", db.url)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = " ".join(proc.stdout.split())
        assert "Prefect server running" in line
        assert db.url.replace(db.password, "***") in line
        assert db.password not in proc.stdout + proc.stderr
        status = _cli(home, tmp_path, "server", "status", "--json")
        assert status.returncode == 0, status.stderr[-3000:]
        assert json.loads(status.stdout)["database"] == db.url.replace(db.password, "***")
    finally:
        stop = _cli(home, tmp_path, "server", "stop")
    assert stop.returncode == 0, stop.stderr[-3000:]
    assert "stopped" in stop.stdout
    assert not any(db.password in p.read_text(errors="replace")
                   for p in (home / "prefect").rglob("*") if p.is_file())


ENSURE = """
import json, os
from pathlib import Path
from cruijff.flows.server import ensure_api, stop_server
home = Path(os.environ["CRUIJFF_HOME"])
try:
    info = ensure_api(home)
    print(json.dumps({**info.__dict__, "env_url": os.environ["PREFECT_API_URL"]}))
finally:
    stop_server(home)
"""


def test_ensure_api_uses_the_database_setting(db, tmp_path):
    home = tmp_path / "home"
    proc = subprocess.run(
        [sys.executable, "-c", ENSURE], cwd=tmp_path, capture_output=True, text=True, timeout=180,
        env=_clean_env(tmp_path, CRUIJFF_HOME=str(home), CRUIJFF_SERVER_DATABASE_URL=db.url),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["managed"] and info["env_url"] == info["url"]
    assert info["database"] == db.url.replace(db.password, "***")
    assert not (home / "prefect" / "prefect.db").exists()
    assert db.password not in (home / "prefect" / "server.json").read_text()


def test_ensure_api_refuses_a_running_server_on_another_database(db, tmp_path):
    home = tmp_path / "home"
    sqlite_server = start_server(home)  # e.g. started before the setting was made
    try:
        proc = subprocess.run(
            [sys.executable, "-c", ENSURE], cwd=tmp_path, capture_output=True, text=True,
            timeout=180,
            env=_clean_env(tmp_path, CRUIJFF_HOME=str(home), CRUIJFF_SERVER_DATABASE_URL=db.url,
                           PREFECT_API_URL=sqlite_server.url),  # as a child of `cruijff run`
        )
    finally:
        stop_server(home)
    assert proc.returncode != 0
    assert "already running" in proc.stderr and "stop it first" in proc.stderr
    assert db.url.replace(db.password, "***") in proc.stderr
    assert db.password not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_a_three_trial_experiment_runs_on_the_postgresql_server(db, pg_server, pg_home,
                                                               tmp_path, tiny_random_model):
    """The same kind of experiment as the other run tests, its flow runs kept in PostgreSQL."""
    from conftest import cruijff, make_site

    (tmp_path / "site").mkdir()
    site = make_site(tmp_path / "site", tiny_random_model)
    env = _clean_env(tmp_path, CRUIJFF_HOME=str(pg_home), PREFECT_API_URL=pg_server.url,
                     HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
                     HF_DATASETS_CACHE=str(tmp_path / "hf"))
    result = cruijff("run", "--local", "--config-path", site / "config.yaml", "--root", site,
                     "--name", "onpg", "--task", "capitalization",
                     "--dataset", "words_5L_80_1000.json", "--model", "cruijff/tiny-llama-random",
                     "--control", "use_fine_tune=false", "--treatments",
                     '{"eval.limit": [1, 2]}', env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = query(db.url, "SELECT name, state_type::text FROM flow_run "
                         "WHERE tags ? 'exp:onpg' ORDER BY name")
    assert rows == [("onpg", "COMPLETED"), ("onpg/trial-a", "COMPLETED"),
                    ("onpg/trial-b", "COMPLETED"), ("onpg/trial-c", "COMPLETED")]
