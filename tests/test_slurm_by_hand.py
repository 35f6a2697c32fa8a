"""A generated `<stage>.slurm` run by hand records its stage as `cruijff run` does: the same
record and key, `summary` counts it, `run` skips it. Locally the script runs under bash
(exactly what sbatch would run) on test-double stages; on the real single-node Slurm a tiny
fine-tune is submitted with sbatch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import cruijff, make_site
from slurm_support import require_slurm, sbatch, wait_for, wait_for_job

from cruijff.errors import CruijffError
from cruijff.pipeline import RunPlan, run_in_process
from cruijff.runner import load_experiment, run_lock, stage_key
from cruijff.state import read_record

TOUCH, SHARED = "testing_touch", "testing_shared"


def by_hand(script: Path) -> subprocess.CompletedProcess:
    """Run a generated batch script the way its job would, outside Slurm."""
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300)


def summary_states(cli, exp: Path) -> dict[str, dict[str, str]]:
    result = cli("summary", "--json", exp)
    return {t["id"]: {s: v["state"] for s, v in t["stages"].items()}
            for t in json.loads(result.out)["trials"]}


@pytest.fixture
def two_stages(doubles):
    """Trials a and b running testing_shared (equal for both: one runs it, the other links
    it) then testing_touch."""
    return doubles([SHARED, TOUCH], [{f"{TOUCH}.index": 1}, {f"{TOUCH}.index": 2}])


def test_a_script_run_by_hand_records_its_stage_as_a_run_does(two_stages, cli):
    exp = two_stages
    done = by_hand(exp / "trial-a" / f"{SHARED}.slurm")
    assert done.returncode == 0, done.stderr
    trial = load_experiment(exp).trial("a")
    record = read_record(trial.dir, SHARED)
    assert record.status == "done" and record.key == stage_key(trial, SHARED)
    assert record.log == f"logs/{SHARED}-attempt1.log" and record.fingerprint
    assert summary_states(cli, exp)["a"] == {SHARED: "done", TOUCH: "pending"}
    assert (trial, SHARED) not in RunPlan.make(exp).todo()
    outcome = run_in_process(RunPlan.make(exp, trials="a", workers=1))
    assert outcome == {"a": {SHARED: "skipped", TOUCH: "done"}}
    assert read_record(trial.dir, SHARED).run_id == record.run_id  # not run again


def test_a_run_after_a_shared_stage_by_hand_reuses_it_for_the_other_trials(two_stages):
    exp = two_stages
    assert by_hand(exp / "trial-a" / f"{SHARED}.slurm").returncode == 0
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(
        run_in_process(RunPlan.make(exp, workers=1))), daemon=True)
    runner.start()
    runner.join(120)  # a guard against the hang, not a measurement
    assert outcome == {"a": {SHARED: "skipped", TOUCH: "done"},
                       "b": {SHARED: "reused", TOUCH: "done"}}  # b links the run by hand


def test_a_shared_stage_by_hand_reuses_an_equal_run_as_a_run_does(two_stages, cli):
    exp = two_stages
    for script in (f"trial-a/{SHARED}", f"trial-a/{TOUCH}", f"trial-b/{TOUCH}",
                   f"trial-b/{SHARED}"):
        result = by_hand(exp / f"{script}.slurm")
        if script == f"trial-b/{TOUCH}":  # before its shared stage: refused
            assert result.returncode == 2, result.stderr
            continue
        assert result.returncode == 0, result.stderr
    assert "reused trial a's run" in result.stdout
    assert by_hand(exp / "trial-b" / f"{TOUCH}.slurm").returncode == 0
    assert read_record(exp / "trial-b", SHARED).reused_from == "a"
    assert summary_states(cli, exp) == {"a": {SHARED: "done", TOUCH: "done"},
                                        "b": {SHARED: "reused", TOUCH: "done"}}
    assert RunPlan.make(exp).todo() == []


def test_a_stage_done_already_is_not_run_again(two_stages):
    script = two_stages / "trial-a" / f"{SHARED}.slurm"
    assert by_hand(script).returncode == 0
    first = read_record(two_stages / "trial-a", SHARED).run_id
    again = by_hand(script)
    assert again.returncode == 0 and "already done" in again.stdout
    assert read_record(two_stages / "trial-a", SHARED).run_id == first


def test_a_stage_whose_earlier_stage_is_not_done_is_refused_in_one_line(two_stages):
    result = by_hand(two_stages / "trial-a" / f"{TOUCH}.slurm")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: trial a {TOUCH} needs {SHARED} done first (it is pending): submit "
        f"{two_stages / 'trial-a' / SHARED}.slurm, or `cruijff run {two_stages} --trials a`"]
    assert read_record(two_stages / "trial-a", TOUCH) is None


def test_a_failure_by_hand_is_recorded_and_classed_as_a_run_does(doubles, cli):
    exp = doubles([TOUCH], [{f"{TOUCH}.exit_code": 3}])
    result = by_hand(exp / "trial-a" / f"{TOUCH}.slurm")
    assert result.returncode == 1
    record = read_record(exp / "trial-a", TOUCH)
    assert (record.status, record.failure) == ("failed", "transient")
    assert "exit code 3" in record.error
    assert result.stderr.strip().splitlines() == [
        f"trial a {TOUCH} failed (transient): exit code 3; log: logs/{TOUCH}-attempt1.log"]
    assert summary_states(cli, exp)["a"] == {TOUCH: "failed"}
    assert RunPlan.make(exp, failed=True).trials == "a"


def test_a_stage_by_hand_is_refused_while_a_run_holds_the_experiment(two_stages):
    with run_lock(load_experiment(two_stages)):
        result = by_hand(two_stages / "trial-a" / f"{SHARED}.slurm")
    assert result.returncode == 2
    assert "is being run by `cruijff run`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert read_record(two_stages / "trial-a", SHARED) is None


def test_while_a_stage_runs_by_hand_neither_it_nor_a_run_starts_again(doubles, tmp_path, cli):
    gate = tmp_path / "gate"
    exp = doubles([TOUCH], [{f"{TOUCH}.wait_for": str(gate)}, {f"{TOUCH}.index": 2}])
    script = exp / "trial-a" / f"{TOUCH}.slurm"
    first = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (r := read_record(exp / "trial-a", TOUCH)) and r.status == "running",
                 60, "the stage run by hand to start")
        # summary sees the job by hand at work (its stage lock), not an interrupted record
        assert summary_states(cli, exp)["a"] == {TOUCH: "running"}
        second = by_hand(script)
        assert second.returncode == 2 and "already running by hand" in second.stderr
        other_trial = by_hand(exp / "trial-b" / f"{TOUCH}.slurm")  # another stage: runs
        assert other_trial.returncode == 0, other_trial.stderr
        with pytest.raises(CruijffError, match="already being run"):
            run_in_process(RunPlan.make(exp, workers=1))
    finally:
        gate.touch()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert read_record(exp / "trial-a", TOUCH).status == "done"
    assert read_record(exp / "trial-a", TOUCH).attempts == 1


def test_the_stage_command_says_what_it_cannot_run(two_stages, cli):
    assert cli("stage", two_stages / "trial-a", "eval").code == 2
    result = cli("stage", two_stages / "trial-z", SHARED)
    assert result.code == 2 and "is no trial folder" in result.err


# ---- on the real single-node Slurm ------------------------------------------------------

TINY = "cruijff/tiny-llama-random"
SLURM_CONFIG = """resources:
  default: {time: "00:10:00"}
  cruijff__tiny-llama-random: {mem: 2}
slurm:
  prologue:
    - echo "site prologue ran in job $SLURM_JOB_ID"
"""


@pytest.mark.slow
@pytest.mark.slurm
def test_a_stage_submitted_with_sbatch_by_hand_counts_as_run(tmp_path, tiny_random_model):
    require_slurm()
    site = make_site(tmp_path, tiny_random_model, SLURM_CONFIG)
    env = dict(os.environ, CRUIJFF_HOME=str(tmp_path / "home"),
               PREFECT_API_URL="http://127.0.0.1:9/api")  # no Prefect: nothing may need one
    built = cruijff("build", "--config-path", site / "config.yaml", "--root", site, "--name",
                    "byhand", "--task", "capitalization", "--dataset",
                    "words_5L_80_1000.json", "--model", TINY, "--treatment",
                    "torchtune.model.lora_rank=4", "--control", "torchtune.epochs=1",
                    "--control", "torchtune.max_steps_per_epoch=4", env=env)
    assert built.returncode == 0, built.stderr
    exp = site / "byhand"
    trial = next(t for t in load_experiment(exp).trials if "finetune" in t.stages)

    early = sbatch([trial.dir / "eval.slurm"], cwd=tmp_path)  # before its fine-tune: refused
    assert wait_for_job(early, timeout=120).exit_code.startswith("2")
    assert "needs finetune done first" in (trial.dir / "logs" / f"eval-{early}.out").read_text()

    job = sbatch([trial.dir / "finetune.slurm"], cwd=tmp_path)
    finished = wait_for_job(job, timeout=480)
    log = (trial.dir / "logs" / f"finetune-{job}.out").read_text(errors="replace")
    assert finished.state == "COMPLETED", log
    assert f"site prologue ran in job {job}" in log
    record = read_record(trial.dir, "finetune")
    assert record.status == "done" and record.where == f"slurm:{job}"
    assert record.key == stage_key(load_experiment(exp).trial(trial.id), "finetune")
    assert record.environment["SLURM_MEM_PER_NODE"] == "2048"
    assert record.slurm is not None and record.slurm.step_name  # its own step, as in a run

    summary = cruijff("summary", "--json", exp, "--trials", trial.id, env=env)
    stages = json.loads(summary.stdout)["trials"][0]["stages"]
    assert stages["finetune"]["state"] == "done"
    ran = cruijff("run", exp, "--trials", trial.id, "--stage", "finetune", "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["ran"] is False
    assert read_record(trial.dir, "finetune").run_id == record.run_id


def test_the_prologue_runs_in_the_job_before_the_stage(tmp_path):
    """What the Slurm test's prologue exports reaches the stage: checked here on the script,
    without Slurm, by running its lines up to the command."""
    script = tmp_path / "s.slurm"
    from cruijff.settings import ResourceProfile
    from cruijff.slurm import render_script

    script.write_text(render_script(
        job_name="j", resources=ResourceProfile(), workdir=tmp_path, log_file=tmp_path / "l",
        description="d", prologue=["export SITE_VALUE='a b'", "cd /"],
        command=[sys.executable, "-c", "import os; print(os.environ['SITE_VALUE'], os.getcwd())"]))
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["a", "b", str(tmp_path)]
