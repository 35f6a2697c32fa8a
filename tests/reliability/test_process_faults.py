"""Process faults: Ctrl-C and SIGTERM, kill -9 of `cruijff run` during an eval and during a
record write, a stage process killed, the Prefect server killed mid-run.

Most cases use the `testing_touch` test-double stage (it writes one file once its release file
exists), so a stage can be held running for as long as a test needs without burning CPU.
Afterwards each case checks: summary explains the state, nothing done before the fault is
re-executed, and a plain `cruijff run` completes the experiment."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import cruijff
from cruijff.flows.status import ORPHAN_MIN_AGE

from cruijff.runner import load_experiment, unlocked
from cruijff.state import StageRecord, read_record, write_record

TOUCH = "testing_touch"


def build_touch(project, env, name: str, waits: list[str]) -> Path:
    """An experiment of len(waits) touch trials; trial i waits for file waits[i] ('' = no)."""
    config = project.config.read_text().replace("run_control_trials: true",
                                                "run_control_trials: false")
    project.config.write_text(config + f"pipeline: [{TOUCH}]\n")
    treatments = json.dumps([{f"{TOUCH}.wait_for": w, f"{TOUCH}.index": i}
                             for i, w in enumerate(waits)])
    result = cruijff("build", "--config-path", project.config, "--task", "toy", "--model",
                     "cruijff/tiny-llama-random", "--dataset", "d.json", "--treatments",
                     treatments, "--name", name, "--root", project.experiments, env=env)
    assert result.returncode == 0, result.stderr
    return project.experiments / name


def start_run(exp: Path, env: dict, *args: str) -> subprocess.Popen:
    """`cruijff run` in its own session, as a terminal's foreground job would be."""
    return subprocess.Popen([sys.executable, "-m", "cruijff", "run", "-q", *args, str(exp)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_until(condition, what: str, timeout: float = 120, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before {what}: {out[-2000:]} {err[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.2)


def status(exp: Path, trial: str, stage: str = TOUCH) -> str | None:
    record = read_record(exp / f"trial-{trial}", stage)
    return record.status if record else None


def stage_processes(exp: Path) -> list[str]:
    """The stages' own processes (not the `cruijff.usage` launcher each one runs under)."""
    found = subprocess.run(["pgrep", "-f", f"{exp}/trial-"], capture_output=True, text=True)
    launchers = subprocess.run(["pgrep", "-f", f"cruijff.usage --out {exp}/trial-"],
                               capture_output=True, text=True).stdout.split()
    return [pid for pid in found.stdout.split() if pid not in launchers]


def summary_states(exp: Path, env: dict) -> tuple[int, dict[str, str]]:
    result = cruijff("summary", "--json", exp, env=env)
    data = json.loads(result.stdout)
    return result.returncode, {t["id"]: t["stages"][TOUCH]["state"] for t in data["trials"]}


async def flow_run_states(api: str, experiment: str) -> dict[str, str]:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async with PrefectClient(api=api) as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"exp:{experiment}"])))
    return {r.name: r.state.type.value for r in runs}


async def running_flow_run_starts(api: str, experiment: str) -> list[datetime]:
    """When each of the experiment's flow runs that say Running started (now, if unknown)."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    async with PrefectClient(api=api) as client:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"exp:{experiment}"]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    return [r.start_time or datetime.now(UTC) for r in runs]


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_stopped_run_ends_its_stages_frees_the_lock_and_resumes(project, prefect_env,
                                                                   tmp_path, how):
    release = tmp_path / "release"
    exp = build_touch(project, prefect_env, f"stop-{how}", ["", str(release), str(release)])
    run = start_run(exp, prefect_env, "--workers", "3")
    wait_until(lambda: status(exp, "a") == "done" and status(exp, "b") == "running"
               and status(exp, "c") == "running" and len(stage_processes(exp)) == 2,
               "trial a is done and b, c are running", proc=run)
    done_a = read_record(exp / "trial-a", TOUCH).run_id

    if how == "ctrl-c":
        os.killpg(run.pid, signal.SIGINT)  # what a terminal sends to its foreground job
    else:
        run.send_signal(signal.SIGTERM)  # what scancel or a scheduler sends
    out, err = run.communicate(timeout=60)  # stages get SIGTERM, then SIGKILL after 10 s
    assert run.returncode == 130, out + err
    assert "Stopped:" in err and "resumes" in err and "Traceback" not in out + err

    assert stage_processes(exp) == [], "a stopped stage is still running"
    assert unlocked(load_experiment(exp)), "the run lock was not freed"
    for trial in "bc":
        record = read_record(exp / f"trial-{trial}", TOUCH)
        assert record.status == "interrupted" and "stopped by the user" in record.error
        assert not (exp / f"trial-{trial}" / "touch" / "output.txt").exists()
    code, states = summary_states(exp, prefect_env)
    assert code == 1 and states == {"a": "done", "b": "interrupted", "c": "interrupted"}
    flows = asyncio.run(flow_run_states(prefect_env["PREFECT_API_URL"], exp.name))
    assert flows[exp.name] == "CANCELLED"
    assert flows[f"{exp.name}/trial-a"] == "COMPLETED"
    assert flows[f"{exp.name}/trial-b"] == flows[f"{exp.name}/trial-c"] == "CANCELLED"

    release.touch()
    again = cruijff("run", exp, env=prefect_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert read_record(exp / "trial-a", TOUCH).run_id == done_a, "a done stage ran again"
    assert summary_states(exp, prefect_env) == (0, dict.fromkeys("abc", "done"))


def test_a_killed_stage_process_is_retried_and_the_run_completes(project, prefect_env,
                                                                 tmp_path):
    """Locally the Dask workers are threads of `cruijff run` (killing one is killing the run:
    see the kill -9 tests); what can die alone is the stage's process."""
    release = tmp_path / "release"
    exp = build_touch(project, prefect_env, "stage-killed", [str(release)])
    run = start_run(exp, prefect_env)
    wait_until(lambda: len(stage_processes(exp)) == 1, "the stage runs", proc=run)
    os.kill(int(stage_processes(exp)[0]), signal.SIGKILL)
    wait_until(lambda: (r := read_record(exp / "trial-a", TOUCH)) is not None
               and r.attempts == 2 and r.status == "running", "the retry started", proc=run)
    release.touch()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, out + err
    record = read_record(exp / "trial-a", TOUCH)
    assert record.status == "done" and record.history[0]["status"] == "failed"
    assert "exit code -9" in record.history[0]["error"]


def test_kill_9_during_a_record_write_keeps_the_old_record(project, prefect_env):
    """The process dies between writing a record's temporary file and renaming it: the old
    record stays whole and a reader never sees half a record."""
    exp = build_touch(project, prefect_env, "record-killed", [""])
    assert cruijff("run", exp, env=prefect_env).returncode == 0
    trial = exp / "trial-a"
    before = read_record(trial, TOUCH)
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from cruijff.state import StageRecord, write_record\n"
        "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"write_record(Path({str(trial)!r}), StageRecord({TOUCH!r}, 'k', 'running'))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=prefect_env)
    assert proc.returncode == -signal.SIGKILL
    assert read_record(trial, TOUCH) == before
    assert list((trial / ".cruijff").glob(f".{TOUCH}.json.*.tmp")), "the write was not cut"
    again = cruijff("run", exp, env=prefect_env)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stdout


def test_a_truncated_or_half_written_record_means_not_done(project, prefect_env):
    exp = build_touch(project, prefect_env, "record-cut", ["", ""])
    assert cruijff("run", exp, env=prefect_env).returncode == 0
    path = exp / "trial-b" / ".cruijff" / f"{TOUCH}.json"
    path.write_text(path.read_text()[:40])
    code, states = summary_states(exp, prefect_env)
    assert code == 1 and states == {"a": "done", "b": "pending"}
    done_a = read_record(exp / "trial-a", TOUCH).run_id
    assert cruijff("run", exp, env=prefect_env).returncode == 0
    assert read_record(exp / "trial-b", TOUCH).status == "done"
    assert read_record(exp / "trial-a", TOUCH).run_id == done_a


def test_a_truncated_output_is_detected_and_the_stage_runs_again(project, prefect_env):
    exp = build_touch(project, prefect_env, "output-cut", ["", ""])
    assert cruijff("run", exp, env=prefect_env).returncode == 0
    output = exp / "trial-b" / "touch" / "output.txt"
    output.write_text(output.read_text()[:1])
    code, states = summary_states(exp, prefect_env)
    assert code == 1 and states == {"a": "done", "b": "damaged"}
    shown = cruijff("summary", exp, env=prefect_env).stdout
    assert "changed size since it was verified" in shown
    done_a = read_record(exp / "trial-a", TOUCH).run_id
    assert cruijff("run", exp, env=prefect_env).returncode == 0
    assert output.read_text().split() == ["b", "1"]
    assert read_record(exp / "trial-a", TOUCH).run_id == done_a
    assert summary_states(exp, prefect_env) == (0, {"a": "done", "b": "done"})


def test_a_record_from_before_fingerprints_still_counts_as_done(project, prefect_env):
    """Experiments run by an older cruijff have records without output sizes: still done."""
    exp = build_touch(project, prefect_env, "old-record", [""])
    assert cruijff("run", exp, env=prefect_env).returncode == 0
    record = read_record(exp / "trial-a", TOUCH)
    data = {k: v for k, v in record.__dict__.items() if k != "fingerprint"}
    write_record(exp / "trial-a", StageRecord(**data))
    again = cruijff("run", exp, env=prefect_env)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_the_prefect_server_killed_and_restarted_mid_run_goes_on(project, prefect_env,
                                                                 tmp_path):
    """Back within the Prefect client's retries (about a minute): the run does not notice."""
    from cruijff.flows.server import server_status, start_server

    home = Path(prefect_env["CRUIJFF_HOME"])
    release = tmp_path / "release"
    exp = build_touch(project, prefect_env, "server-back", ["", str(release), str(release)])
    run = start_run(exp, prefect_env, "--workers", "3")
    wait_until(lambda: status(exp, "a") == "done" and len(stage_processes(exp)) == 2,
               "a is done, b and c run", proc=run)
    os.kill(server_status(home).pid, signal.SIGKILL)
    release.touch()
    start_server(home)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert summary_states(exp, prefect_env) == (0, dict.fromkeys("abc", "done"))
    flows = asyncio.run(flow_run_states(prefect_env["PREFECT_API_URL"], exp.name))
    assert flows[exp.name] == "COMPLETED"


def test_the_prefect_server_gone_for_good_fails_loudly_and_keeps_results(project, prefect_env,
                                                                        tmp_path):
    """Not back: the run stops with one line (here after 2 client retries instead of 5); what
    finished meanwhile is recorded; summary explains from disk; the next run resumes."""
    from cruijff.flows.server import server_status, start_server

    home = Path(prefect_env["CRUIJFF_HOME"])
    release = tmp_path / "release"
    exp = build_touch(project, prefect_env, "server-gone", ["", str(release), str(release)])
    env = dict(prefect_env, PREFECT_CLIENT_MAX_RETRIES="2")  # a call waits 2+4 s, not 62 s
    run = start_run(exp, env, "--workers", "3")
    # (a has nothing to wait for: it may be done already)
    wait_until(lambda: status(exp, "b") == status(exp, "c") == "running", "b and c run",
               proc=run)
    os.kill(server_status(home).pid, signal.SIGKILL)
    release.touch()
    try:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 2, out + err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: lost the Prefect server") and "resumes" in last, err
        assert "Traceback" not in out + err
        assert [status(exp, t) for t in "bc"] == ["done"] * 2
        assert unlocked(load_experiment(exp))
        shown = cruijff("summary", "--json", exp, env=prefect_env)
        data = json.loads(shown.stdout)
        assert any("from disk" in note for note in data["notices"])
        states = {t["id"]: t["stages"][TOUCH]["state"] for t in data["trials"]}
        assert states["b"] == states["c"] == "done"
        assert states["a"] in ("done", "pending", "interrupted")  # cut off as it started
    finally:
        start_server(home)
    runs = {t: read_record(exp / f"trial-{t}", TOUCH).run_id for t in "bc"}
    again = cruijff("run", exp, env=prefect_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {t: read_record(exp / f"trial-{t}", TOUCH).run_id for t in "bc"} == runs
    assert summary_states(exp, prefect_env) == (0, dict.fromkeys("abc", "done"))


def test_a_trial_the_busy_server_refused_starts_again(project, prefect_env, monkeypatch):
    """A SQLite-backed Prefect server under load answers 503 even after the client's retries.
    The trial it refused starts again after a pause (here the answer is injected once, into
    trial b's subflow, in a run in this process); nothing runs twice, the run completes."""
    import cruijff.flows.experiment
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    exp = build_touch(project, prefect_env, "busy", ["", ""])
    real, refused = cruijff.flows.experiment.trial_flow, []

    class BusyOnce:
        def with_options(self, **options):
            subflow = real.with_options(**options)

            def call(experiment, trial_id, *args, **kwargs):
                if trial_id == "b" and not refused:
                    refused.append(trial_id)
                    request = httpx.Request("POST", f"{prefect_env['PREFECT_API_URL']}/task_runs/")
                    response = httpx.Response(503, request=request)
                    raise PrefectHTTPStatusError.from_httpx_error(httpx.HTTPStatusError(
                        "Service Unavailable", request=request, response=response))
                return subflow(experiment, trial_id, *args, **kwargs)

            return call

    monkeypatch.setattr(cruijff.flows.experiment, "trial_flow", BusyOnce())
    monkeypatch.setattr(cruijff.flows.experiment, "SERVER_BUSY_PAUSES_S", (0.5,))
    monkeypatch.setenv("CRUIJFF_HOME", prefect_env["CRUIJFF_HOME"])
    with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
        assert cruijff.flows.experiment.run_experiment(exp, workers=2)
    assert refused == ["b"]
    assert [read_record(exp / f"trial-{t}", TOUCH).attempts for t in "ab"] == [1, 1]
    assert summary_states(exp, prefect_env) == (0, dict.fromkeys("ab", "done"))
    flows_run = asyncio.run(flow_run_states(prefect_env["PREFECT_API_URL"], exp.name))
    assert flows_run == {exp.name: "COMPLETED", f"{exp.name}/trial-a": "COMPLETED",
                         f"{exp.name}/trial-b": "COMPLETED"}


@pytest.mark.slow
def test_kill_9_during_an_eval_then_run_again(tmp_path, tiny_random_model, prefect_env):
    """A real Inspect eval of the tiny model, its run killed -9: the eval process dies with it,
    the record says running (summary: interrupted; Prefect: Crashed), and the next run
    evaluates again and reports only the finished evaluation."""
    from conftest import make_site

    (tmp_path / "site").mkdir()
    site = make_site(tmp_path / "site", tiny_random_model)
    built = cruijff("build", "--config-path", site / "config.yaml", "--root", site, "--name",
                    "eval-killed", "--task", "capitalization", "--dataset",
                    "words_5L_80_1000.json", "--model", "cruijff/tiny-llama-random",
                    "--control", "use_fine_tune=false", "--control", "eval.limit=40",
                    env=prefect_env)
    assert built.returncode == 0, built.stderr
    exp = site / "eval-killed"
    run = start_run(exp, prefect_env)
    # Into the eval: the model is loaded and Inspect has written its log's start (an
    # unfinished log the next run must not report).
    wait_until(lambda: status(exp, "a", "eval") == "running" and stage_processes(exp)
               and any((exp / "trial-a" / "logs" / "eval").glob("*.eval")),
               "the eval has started its Inspect log", timeout=300, proc=run)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    wait_until(lambda: not stage_processes(exp), "the eval process is gone", timeout=10)
    assert status(exp, "a", "eval") == "running"
    # summary marks a Running flow run Crashed only once it is older than a run's start-up
    orphans = asyncio.run(running_flow_run_starts(prefect_env["PREFECT_API_URL"], exp.name))
    assert orphans, "the killed run left no flow run Running"
    wait_until(lambda: datetime.now(UTC) - max(orphans) > ORPHAN_MIN_AGE,
               "the orphaned flow runs are old enough to repair", timeout=60)

    shown = cruijff("summary", "--json", exp, env=prefect_env)
    data = json.loads(shown.stdout)
    assert shown.returncode == 1
    assert data["trials"][0]["stages"]["eval"]["state"] == "interrupted"
    assert data["trials"][0]["prefect"] == "Crashed"

    again = cruijff("run", exp, env=prefect_env)
    assert again.returncode == 0, again.stdout + again.stderr
    record = read_record(exp / "trial-a", "eval")
    assert record.status == "done" and record.attempts == 2
    analyzed = cruijff("analyze", "--json", exp, env=prefect_env)
    assert analyzed.returncode == 0, analyzed.stderr
    trials = json.loads(analyzed.stdout)["trials"]
    assert [(t["id"], t["status"], t["metric"]["n"]) for t in trials] == [("a", "ok", 40)]


@pytest.mark.slow
@pytest.mark.slurm
def test_ctrl_c_on_slurm_cancels_the_worker_jobs(tmp_path, tiny_random_model, prefect_env):
    from conftest import make_site
    from slurm_support import require_slurm

    from cruijff.slurm import queued_jobs

    require_slurm()
    release = tmp_path / "release"
    (tmp_path / "site").mkdir()
    site = make_site(tmp_path / "site", tiny_random_model,
                     f"pipeline: [{TOUCH}]\nrun_control_trials: false\n"
                     "orchestration: {executor: slurm, max_jobs: 2}\n"
                     'resources:\n  default: {time: "00:10:00", mem: 1}\n')
    treatments = json.dumps([{f"{TOUCH}.wait_for": str(release), f"{TOUCH}.index": i}
                             for i in range(2)])
    built = cruijff("build", "--config-path", site / "config.yaml", "--root", site, "--name",
                    "slurm-stop", "--task", "capitalization", "--dataset",
                    "words_5L_80_1000.json", "--model", "cruijff/tiny-llama-random",
                    "--treatments", treatments, env=prefect_env)
    assert built.returncode == 0, built.stderr
    exp = site / "slurm-stop"
    run = start_run(exp, prefect_env)
    try:
        wait_until(lambda: status(exp, "a") == "running" and status(exp, "b") == "running",
                   "both stages run in Slurm jobs", timeout=180, proc=run)
        assert len(queued_jobs(exp.name) or []) == 2
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, out + err
    assert "Traceback" not in out + err
    wait_until(lambda: not queued_jobs(exp.name), "the worker jobs are gone", timeout=60)
    assert unlocked(load_experiment(exp))
    code, states = summary_states(exp, prefect_env)
    assert code == 1 and states == {"a": "interrupted", "b": "interrupted"}

    release.touch()
    again = cruijff("run", exp, env=prefect_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary_states(exp, prefect_env) == (0, {"a": "done", "b": "done"})
