"""Slurm faults on the real single-node cluster (scripts/slurm/start.sh): the controller down
when worker jobs are submitted (bounded retries, then one line and exit 2; or the run goes on
when it comes back in time), no sbatch at all, and a drained node (jobs wait; summary, progress
and the live run say why). Whatever a test does to Slurm is undone in its fixture's teardown."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import REPO, cruijff, make_site
from slurm_support import require_slurm, wait_for

from cruijff.runner import load_experiment, unlocked
from cruijff.slurm import parse_squeue, queued_jobs, waiting_note
from cruijff.state import read_record

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
TINY = "cruijff/tiny-llama-random"
NODE = socket.gethostname().split(".")[0]  # scripts/slurm/start.sh: the one node
CONFIG = """orchestration: {{executor: slurm, retries: 0, max_jobs: 1, submit_retries: {retries},
                submit_timeout_s: {budget}}}
resources:
  default: {{time: "00:10:00"}}
  cruijff__tiny-llama-random: {{mem: 2}}
"""


def build(tmp_path: Path, model: Path, env: dict, name: str, *, retries: int = 3,
          budget: float = 60) -> Path:
    """A one-trial eval-only experiment on the tiny random model: the cheapest Slurm run."""
    site = make_site(tmp_path, model, CONFIG.format(retries=retries, budget=budget))
    result = cruijff("build", "--config-path", site / "config.yaml", "--root", site, "--name",
                     name, "--task", "capitalization", "--dataset", "words_5L_80_1000.json",
                     "--model", TINY, "--control", "use_fine_tune=false", "--control",
                     "eval.limit=1", env=env)
    assert result.returncode == 0, result.stderr
    return site / name


def flow_states(env: dict, experiment: str) -> dict[str, str]:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async def read() -> dict[str, str]:
        async with PrefectClient(api=env["PREFECT_API_URL"]) as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[f"exp:{experiment}"])))
            return {run.name: run.state_type.value for run in runs}

    return asyncio.run(read())


def controller_pid() -> int | None:
    try:
        pid = int(Path("/run/slurmctld.pid").read_text().strip())
        return pid if Path(f"/proc/{pid}/comm").read_text().strip() == "slurmctld" else None
    except (OSError, ValueError):
        return None


def start_controller() -> None:
    # Not with this process's OMP_NUM_THREADS=1: start.sh sizes the node with `nproc`, which
    # honours it, and would rewrite slurm.conf with CPUs=1 (one job at a time, for everyone).
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "start.sh")], check=True,
                   capture_output=True, timeout=120, env=env)


@pytest.fixture
def controller_down() -> Iterator[None]:
    """slurmctld stopped (sbatch then fails after ~9 s: 'Unable to contact slurm controller');
    started again on teardown, whatever happened."""
    require_slurm()
    pid, cpus = controller_pid(), node_cpus()
    assert pid is not None, "slurmctld is not running"
    try:
        os.kill(pid, 15)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, "slurmctld to stop")
        yield
    finally:
        start_controller()
    assert node_cpus() == cpus, "the restarted cluster must be the one we stopped"


def node_cpus() -> str:
    return subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%c"], capture_output=True,
                          text=True, timeout=30).stdout.strip()


@pytest.fixture
def slurm_env(prefect_env) -> dict:
    require_slurm()
    return prefect_env


def cancel_jobs_of(experiment: str) -> None:
    jobs = queued_jobs(experiment) or []
    if jobs:
        subprocess.run(["scancel", *(j.id for j in jobs)], capture_output=True, timeout=30)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a run that stopped; no traceback anywhere."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def assert_stopped_cleanly(exp: Path, env: dict) -> None:
    """No stage record left running, the run lock free, no flow run left Running."""
    assert read_record(exp / "trial-a", "eval") is None
    assert unlocked(load_experiment(exp))
    states = flow_states(env, exp.name)
    assert states.get(exp.name) == "FAILED", states
    assert "RUNNING" not in states.values(), states


def test_squeue_lines_are_matched_to_their_experiment_whole():
    text = ("7|cruijff-exp-profile1|PENDING|debug|ReqNodeNotAvail, UnavailableNodes:vm\n"
            "8|cruijff-exp-profile1|PENDING|debug|ReqNodeNotAvail, UnavailableNodes:vm\n"
            "9|cruijff-exp-profile2|RUNNING|debug|None\n"
            "10|cruijff-exp-b-profile1|PENDING|debug|Priority\n"
            "11|other|PENDING|debug|Resources\n")
    jobs = parse_squeue(text, "exp")
    assert [j.id for j in jobs] == ["7", "8", "9"]
    assert waiting_note(jobs) == ("waiting for Slurm: 2 jobs PENDING (ReqNodeNotAvail, "
                                  "UnavailableNodes:vm)")
    assert waiting_note(parse_squeue(text, "exp-b")) == "waiting for Slurm: 1 job PENDING " \
        "(Priority)"
    assert waiting_note(jobs[2:]) is None
    assert waiting_note(jobs[:1], ["vm drained: disk swap"]) == (
        "waiting for Slurm: 1 job PENDING (ReqNodeNotAvail, UnavailableNodes:vm); node vm "
        "drained: disk swap")


FAKE_SBATCH = """#!/bin/sh
n=$(cat "$0.count" 2>/dev/null || echo 0); echo $((n + 1)) > "$0.count"
if [ "$n" -lt "{fail}" ]; then
  {hang}echo "sbatch: error: Batch job submission failed: Unable to contact slurm controller \\
(connect failure)" >&2; exit 1
fi
echo "Submitted batch job 4242"
"""


def fake_sbatch(tmp_path: Path, monkeypatch, *, fail: int, hang: bool = False) -> Path:
    """An sbatch first on PATH that fails its first `fail` calls (after a long sleep if
    `hang`), then answers as sbatch does; `<it>.count` counts its calls."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "sbatch"
    script.write_text(FAKE_SBATCH.format(fail=fail, hang="sleep 30; " if hang else ""))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    monkeypatch.setattr("cruijff.flows.clusters.FIRST_WAIT_S", 0.2)
    return script


def submitter(tmp_path: Path, retries: int, budget: float):
    from cruijff.flows.clusters import Submitter

    from cruijff.settings import OrchestrationConfig

    return Submitter(OrchestrationConfig(submit_retries=retries, submit_timeout_s=budget),
                     tmp_path / "submit.log")


def test_a_failing_sbatch_is_retried_with_doubling_waits_then_given_up(tmp_path, monkeypatch):
    script = fake_sbatch(tmp_path, monkeypatch, fail=99)
    sub = submitter(tmp_path, retries=3, budget=60)
    waits, sleep = [], asyncio.sleep

    async def recorded(seconds: float) -> None:
        waits.append(seconds)
        await sleep(seconds)

    monkeypatch.setattr("cruijff.flows.clusters.asyncio.sleep", recorded)
    assert asyncio.run(sub.submit(["sbatch", "job.sh"])) == ""  # no job: gave up
    assert waits == [0.2, 0.4, 0.8]  # between the 4 tries, doubling
    assert sub.failure is not None and sub.failure.startswith("sbatch failed 4 times over ")
    assert sub.failure.endswith(": Batch job submission failed: Unable to contact slurm "
                                "controller (connect failure): is the Slurm controller up? "
                                "(check with sinfo, then run again)")
    assert len(re.findall(r"try \d failed", (tmp_path / "submit.log").read_text())) == 4
    assert asyncio.run(sub.submit(["sbatch", "job.sh"])) == ""  # later jobs: at once
    assert Path(f"{script}.count").read_text().strip() == "4"


def test_sbatch_answering_again_within_the_budget_submits_the_job(tmp_path, monkeypatch):
    fake_sbatch(tmp_path, monkeypatch, fail=2)
    sub = submitter(tmp_path, retries=3, budget=60)
    assert asyncio.run(sub.submit(["sbatch", "job.sh"])).strip() == "Submitted batch job 4242"
    assert sub.failure is None
    assert "try 3 succeeded: Submitted batch job 4242" in (tmp_path / "submit.log").read_text()


def test_a_hanging_sbatch_is_killed_at_the_end_of_the_budget(tmp_path, monkeypatch):
    fake_sbatch(tmp_path, monkeypatch, fail=99, hang=True)
    sub = submitter(tmp_path, retries=5, budget=2)
    assert asyncio.run(sub.submit(["sbatch", "job.sh"])) == ""
    hanging = [p for p in psutil.process_iter(["cmdline"])
               if any(str(tmp_path) in part for part in p.info["cmdline"] or [])]
    assert hanging == [], "the hanging sbatch (and its sleep) was not killed"
    assert sub.failure is not None
    assert sub.failure.startswith("sbatch failed 1 time over 2 s: sbatch did not answer within "
                                  "2 s: is the Slurm controller up?"), sub.failure


def test_no_sbatch_on_path_stops_the_run_at_once(tmp_path, tiny_random_model, prefect_env):
    exp = build(tmp_path, tiny_random_model, prefect_env, "nosbatch")
    env = dict(prefect_env, PATH=str(Path(sys.executable).parent))
    result = cruijff("run", "-q", "--executor", "slurm", exp, env=env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert error_line(result).startswith("error: sbatch is not on PATH")
    assert not (exp / ".cruijff" / "slurm" / "submit.log").exists()  # at once: no try
    assert_stopped_cleanly(exp, prefect_env)


def test_sbatch_failing_stops_the_run_after_bounded_retries(tmp_path, tiny_random_model,
                                                            slurm_env, controller_down):
    # With the controller down each sbatch fails after ~9 s: try, 2 s, try, then give up.
    exp = build(tmp_path, tiny_random_model, slurm_env, "noctld", retries=1, budget=40)
    result = cruijff("run", "-q", exp, env=slurm_env, timeout=180)  # bounded: it ends
    assert result.returncode == 2, result.stdout + result.stderr
    line = error_line(result)
    assert re.match(r"error: sbatch failed 2 times over \d+ s: .*Unable to contact slurm "
                    r"controller.*: is the Slurm controller up\? \(check with sinfo", line), line
    log = (exp / ".cruijff" / "slurm" / "submit.log").read_text()
    assert len(re.findall(r"try \d failed after \d+ s: .*Unable to contact", log)) == 2, log
    assert_stopped_cleanly(exp, slurm_env)


def test_the_run_goes_on_when_the_controller_comes_back_in_time(tmp_path, tiny_random_model,
                                                                slurm_env, controller_down):
    exp = build(tmp_path, tiny_random_model, slurm_env, "ctldback")
    log = exp / ".cruijff" / "slurm" / "submit.log"
    run = subprocess.Popen([sys.executable, "-m", "cruijff", "run", "-q", str(exp)],
                           env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        wait_for(lambda: log.exists() and "try 1 failed" in log.read_text(), 60,
                 "the first sbatch to fail")
        start_controller()
        output, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        cancel_jobs_of(exp.name)
    assert run.returncode == 0, output
    submitted = re.search(r"try [23] succeeded: Submitted batch job (\d+)", log.read_text())
    assert submitted, log.read_text()
    record = read_record(exp / "trial-a", "eval")
    assert record.status == "done" and record.where == f"slurm:{submitted[1]}"
    assert flow_states(slurm_env, exp.name)[exp.name] == "COMPLETED"


@pytest.fixture
def drained_node() -> Iterator[None]:
    """The node drained (jobs stay PENDING); resumed on teardown, whatever happened."""
    require_slurm()
    subprocess.run(["scontrol", "update", f"nodename={NODE}", "state=drain",
                    "reason=cruijff-test-drain"], check=True, timeout=30)
    try:
        yield
    finally:
        resume_node()


def resume_node() -> None:
    state = subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%T"], capture_output=True,
                           text=True, timeout=30).stdout
    if "drain" in state:
        subprocess.run(["scontrol", "update", f"nodename={NODE}", "state=resume"],
                       capture_output=True, timeout=30)


def test_a_drained_node_keeps_jobs_waiting_and_says_why(tmp_path, tiny_random_model, slurm_env,
                                                        drained_node):
    exp = build(tmp_path, tiny_random_model, slurm_env, "drained")
    live = tmp_path / "run-live.txt"
    env = dict(slurm_env, TTY_COMPATIBLE="1", COLUMNS="200")  # rich draws the live view
    with live.open("w") as handle:
        run = subprocess.Popen([sys.executable, "-m", "cruijff", "run", str(exp)], env=env,
                               stdout=handle, stderr=subprocess.STDOUT, text=True)
    try:
        def waiting():
            jobs = queued_jobs(exp.name) or []
            return jobs if jobs and "DRAINED" in jobs[0].reason else None

        job = wait_for(waiting, 90, "the worker job to wait on the drained node")[0]
        assert job.state == "PENDING"
        summary = cruijff("summary", "--json", exp, env=slurm_env)
        assert summary.returncode == 1, summary.stderr
        data = json.loads(summary.stdout)
        assert data["running"] and not data["complete"]
        assert {"id": job.id, "name": job.name, "state": "PENDING", "partition": job.partition,
                "reason": job.reason} in data["slurm_jobs"]
        note = (f"waiting for Slurm: 1 job PENDING ({job.reason}); node {NODE} drained: "
                "cruijff-test-drain")
        assert note in data["notices"]
        assert data["trials"][0]["stages"]["eval"]["state"] == "pending"
        text = cruijff("summary", exp, env=dict(slurm_env, COLUMNS="300"))
        assert f"note: {note}" in text.stdout
        progress = cruijff("progress", "--no-watch", exp, env=dict(slurm_env, COLUMNS="300"))
        assert note in progress.stdout
        wait_for(lambda: "waiting for Slurm: 1 job PENDING" in live.read_text(errors="replace"),
                 30, "the live run view to show the waiting job")
        assert run.poll() is None, live.read_text()  # Slurm's semantics: it waits, not fails
        resume_node()
        run.wait(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        cancel_jobs_of(exp.name)
    assert run.returncode == 0, live.read_text()
    summary = cruijff("summary", "--json", exp, env=slurm_env)
    data = json.loads(summary.stdout)
    assert summary.returncode == 0 and data["complete"], summary.stdout
    assert data["slurm_jobs"] == [] and not any("waiting" in n for n in data["notices"])
    record = read_record(exp / "trial-a", "eval")
    assert record.status == "done" and data["trials"][0]["stages"]["eval"]["state"] == "done"
    assert record.where == f"slurm:{job.id}"
