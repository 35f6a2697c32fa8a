"""Prefect (and Dask) are imported only where they are used: not for `--help`, not by `summary`
when no Prefect server answers; cruijff's processes run with Prefect's telemetry off and skip
the interpreter's final garbage collections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cruijff.flows import server

PROBE = """
import atexit, gc, json, os, sys
def report():
    with open(os.environ["PROBE_OUT"], "w") as fh:
        json.dump({"modules": [m for m in ("prefect", "distributed", "dask", "inspect_ai")
                               if m in sys.modules],
                   "do_not_track": os.environ.get("DO_NOT_TRACK"),
                   "frozen": gc.get_freeze_count()}, fh)
atexit.register(report)
from cruijff.cli import main
main(sys.argv[1:])
"""


def probe(tmp_path: Path, *args: object, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `cruijff ARGS` in a new process; what it had imported when it exited."""
    out = tmp_path / "probe.json"
    run_env = {k: v for k, v in os.environ.items()
               if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    run_env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PROBE_OUT=str(out),
                   CRUIJFF_HOME=str(tmp_path / "cruijff-home"), **(env or {}))
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], env=run_env,
                          cwd=cwd or tmp_path, capture_output=True, text=True, timeout=300)
    return proc, json.loads(out.read_text())


@pytest.mark.parametrize("args", [["--help"], ["summary", "--help"], ["build", "--help"],
                                  ["run", "--help"], ["analyze", "--help"]])
def test_help_imports_neither_prefect_nor_dask(tmp_path, args):
    proc, seen = probe(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert seen["modules"] == []


def test_summary_without_a_server_does_not_import_prefect(tmp_path, built):
    """No PREFECT_API_URL anywhere (environment, profile, prefect.toml, .env) and no managed
    server: the summary comes from disk, and Prefect is never imported."""
    proc, seen = probe(tmp_path, "summary", "--json", built)
    assert proc.returncode == 1, proc.stderr  # stages not done
    assert "The Prefect server is not running" in proc.stdout
    assert seen["modules"] == []


def test_summary_with_an_unreachable_url_does_not_import_prefect(tmp_path, built):
    proc, seen = probe(tmp_path, "summary", built,
                       env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert proc.returncode == 1, proc.stderr
    assert seen["modules"] == []


def test_summary_reads_a_running_server_without_importing_prefect(tmp_path, built,
                                                                   prefect_env):
    """Prefect's flow-run states come over its REST API: the ~2 s import of Prefect was most
    of a 1,000-trial summary's time (issue 17)."""
    proc, seen = probe(tmp_path, "summary", "--json", built,
                       env={"PREFECT_API_URL": prefect_env["PREFECT_API_URL"]})
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["notices"] == []  # the server answered
    assert seen["modules"] == []


def test_cruijff_turns_prefect_telemetry_off_and_keeps_a_choice_made(tmp_path):
    _, seen = probe(tmp_path, "version")
    assert seen["do_not_track"] == "1"
    _, seen = probe(tmp_path, "version", env={"DO_NOT_TRACK": "0"})
    assert seen["do_not_track"] == "0"


def test_objects_made_by_a_command_are_frozen_out_of_the_last_collections(tmp_path):
    """At exit (the probe reports after cruijff's own exit handlers), what the command made is
    in the permanent generation, which the interpreter's final collections skip: walking it
    took 1.2-1.4 s of every run's exit."""
    proc, seen = probe(tmp_path, "version")
    assert proc.returncode == 0, proc.stderr
    assert seen["frozen"] > 10_000


def test_a_file_that_may_set_the_api_url_is_still_asked(tmp_path, monkeypatch):
    """The shortcut skips Prefect's settings only when no file could set the URL."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    assert not server._may_configure_api()
    (home / "profiles.toml").write_text('[profiles.x]\nPREFECT_API_URL = "http://h/api"\n')
    assert server._may_configure_api()
    (home / "profiles.toml").unlink()
    (tmp_path / "pyproject.toml").write_text("[tool.prefect.api]\nurl = 'http://h/api'\n")
    assert server._may_configure_api()
    (tmp_path / "pyproject.toml").write_text("[tool.ruff]\n")
    assert not server._may_configure_api()
    (tmp_path / "prefect.toml").write_text("")
    assert server._may_configure_api()


def test_a_profile_url_is_found_as_before(tmp_path, monkeypatch):
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "x"\n[profiles.x]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    url, source = server._configured_api_url()
    assert url == "http://127.0.0.1:9/api" and "profile 'x'" in source


def test_what_a_run_publishes_at_its_end_imports_no_sqlalchemy(tmp_path):
    """The report note and the headline's interval read from a log need neither the store nor
    SQLAlchemy: importing them was ~0.4 s of every run's tail."""
    code = ("import sys; from pathlib import Path; from types import SimpleNamespace; "
            "from cruijff.flows import artifacts; import cruijff.log_scores; "
            "artifacts.report_markdown(SimpleNamespace(name='x', path=Path('.')), []); "
            "print('sqlalchemy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
