"""After a Slurm attempt: the record gets the scheduler's view, an OUT_OF_MEMORY is named
with the figure it reached, and grow_on_oom makes the retry ask for more memory, within its
cap. sacct is stubbed here (named in each test): the real single-node Slurm tests are in
tests/test_slurm_compute.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from cruijff import attempts, sacct
from cruijff.pipeline import Sharing, run_trial
from cruijff.runner import execute_stage, load_experiment
from cruijff.settings import GrowPolicy
from cruijff.state import SlurmAccounting, read_record, write_record

COMPUTE = "testing_compute"


@pytest.fixture
def experiment(doubles):
    def build(resources: str = "", orchestration: str = "{retries: 2}") -> Path:
        return doubles([COMPUTE], [{f"{COMPUTE}.allocate_mb": 1}],
                       config=f"orchestration: {orchestration}\n{resources}")

    return build


def oom_on_slurm(trial, stage, key, grown):
    """A stand-in for a Slurm attempt that ran out of memory: the stage really runs (here),
    its record then says it ran in job 77 and failed, as a worker's would."""
    execute_stage(trial, stage, key, grown=grown)
    record = read_record(trial.dir, stage)
    record.where, record.status = "slurm:77", "failed"
    record.slurm = SlurmAccounting(job_id="77", step_name="s")
    write_record(trial.dir, record)
    return False


def test_an_oom_attempt_is_retried_with_more_memory_up_to_the_cap_with_sacct_stubbed(
        experiment, monkeypatch):
    exp = experiment(resources="resources: {default: {mem: 2}}\n")
    experiment_ = load_experiment(exp)
    trial = experiment_.trial("a")
    asked_for, lines = [], []

    def stub_sacct(job_id, step_id, step_name, *, requested, wait_s, poll_s=1.0):
        return SlurmAccounting(job_id=job_id, step_id="3", step_name=step_name,
                               requested=dict(requested), state="OUT_OF_MEMORY",
                               max_rss_mib=requested["mem_mib"] * 1.02, source="sacct")

    monkeypatch.setattr(sacct, "step_accounting", stub_sacct)

    def submit(trial, stage, key, attempt, grown):
        asked_for.append(grown)
        return oom_on_slurm(trial, stage, key, grown)

    from cruijff import pipeline

    policy = GrowPolicy(factor=2, max_mem=5)
    done = pipeline.run_with_retries(trial, COMPUTE, "k", submit, retries=2,
                                     grow_on_oom=policy, say=lines.append)
    assert not done
    assert asked_for == [None, {"mem": 4}, {"mem": 5}]  # ×2, then the cap
    assert lines == [
        "trial a testing_compute OUT_OF_MEMORY at 2.0/2G (sacct: step 77.3); retrying with "
        "mem 4G (grow_on_oom ×2, cap 5G)",
        "trial a testing_compute OUT_OF_MEMORY at 4.1/4G (sacct: step 77.3); retrying with "
        "mem 5G (grow_on_oom ×2, cap 5G)"]
    record = read_record(trial.dir, COMPUTE)
    assert record.outcome == "OUT_OF_MEMORY" and record.grown == {"mem": 5}
    assert record.slurm.requested["mem_mib"] == 5 * 1024
    assert record.error.startswith("OUT_OF_MEMORY at 5.1/5G")
    # the earlier attempts' figures survive in the history
    assert [h.get("outcome") for h in record.history] == ["OUT_OF_MEMORY"] * 2
    assert [h["requested"]["mem_mib"] for h in record.history] == [2048, 4096]


def test_nothing_grows_without_a_policy_or_for_another_failure_with_sacct_stubbed(
        experiment, monkeypatch):
    exp = experiment(resources="resources: {default: {mem: 2}}\n")
    trial = load_experiment(exp).trial("a")
    state = {"value": "FAILED"}
    monkeypatch.setattr(sacct, "step_accounting", lambda job, step, name, *, requested,
                        wait_s, poll_s=1.0: SlurmAccounting(job_id=job, state=state["value"],
                                                            requested=dict(requested)))
    seen = []

    def submit(trial, stage, key, attempt, grown):
        seen.append(grown)
        return oom_on_slurm(trial, stage, key, grown)

    from cruijff.pipeline import run_with_retries

    run_with_retries(trial, COMPUTE, "k", submit, retries=1,
                     grow_on_oom=GrowPolicy(max_mem=8), say=seen.append)
    assert seen == [None, None]  # FAILED is not OUT_OF_MEMORY
    state["value"] = "OUT_OF_MEMORY"
    seen.clear()
    run_with_retries(trial, COMPUTE, "k", submit, retries=1, grow_on_oom=None, say=seen.append)
    assert seen == [None, None]


def test_a_local_attempt_is_left_as_it_is(experiment, monkeypatch):
    """No Slurm, nothing asked: settling must not call sacct at all."""
    exp = experiment()
    trial = load_experiment(exp).trial("a")
    monkeypatch.setattr(sacct, "step_accounting", lambda *a, **k: pytest.fail("sacct asked"))
    outcome = run_trial(load_experiment(exp), trial, [COMPUTE],
                        lambda t, s, k, a, g: execute_stage(t, s, k).is_done,
                        sharing=Sharing([(trial, [COMPUTE])]), retries=0)
    assert outcome == {COMPUTE: "done"}
    record = read_record(trial.dir, COMPUTE)
    assert record.slurm is None and record.outcome is None and record.usage is not None


@pytest.mark.parametrize(("values", "figures"), [
    ({"mem": 8, "time": "01:30:00", "cpus_per_task": 4, "gres": "gpu:a100:2"},
     {"mem_mib": 8192, "time_s": 5400, "cpus": 4, "gpus": 2}),
    ({"gres": 1}, {"gpus": 1}), ({}, {})])
def test_what_a_profile_asks_for_in_record_units(values, figures):
    from cruijff.settings import ResourceProfile

    assert attempts.asked(ResourceProfile(**values)) == figures
