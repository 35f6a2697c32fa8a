"""Experiments on the real single-node Slurm: stages in worker jobs with the requested
resources, a cancelled job retried on a new one, exhausted retries failing one trial only."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from conftest import cruijff, make_site
from slurm_support import require_slurm, wait_for

from cruijff.state import read_record

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
TINY = "cruijff/tiny-llama-random"
SLURM_CONFIG = """orchestration: {executor: slurm, retries: RETRIES, max_jobs: 2}
resources:
  default: {time: "00:10:00"}
  cruijff__tiny-llama-random: {mem: 2, gres: 1}
"""
FAST = ["--control", "torchtune.epochs=1", "--control", "torchtune.max_steps_per_epoch=4",
        "--control", "eval.limit=2"]


@pytest.fixture
def slurm_site(tmp_path, tiny_random_model, prefect_env):
    require_slurm()

    def make(retries: int):
        return make_site(tmp_path, tiny_random_model,
                         SLURM_CONFIG.replace("RETRIES", str(retries)))

    return make


def build_args(site, name: str, *extra: str, fast: list[str] = FAST) -> list:
    return ["--config-path", site / "config.yaml", "--root", site, "--name", name,
            "--task", "capitalization", "--dataset", "words_5L_80_1000.json", "--model", TINY,
            *fast, *extra]


def test_each_stage_runs_in_a_slurm_job_with_the_requested_resources(slurm_site, prefect_env):
    site = slurm_site(retries=1)
    result = cruijff("run", *build_args(site, "onslurm", "--treatment", "eval.limit=1",
                                        "--treatment", "torchtune.model.lora_rank=4"),
                     env=prefect_env)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = set()
    for trial in "abc":
        for stage in ("finetune", "eval"):
            record = read_record(site / "onslurm" / f"trial-{trial}", stage)
            if record.status == "reused":
                continue
            environment = record.environment
            assert record.status == "done"
            assert record.where == f"slurm:{environment['SLURM_JOB_ID']}"
            assert environment["SLURM_MEM_PER_NODE"] == "2048"
            assert len(environment["SLURM_JOB_GPUS"].split(",")) == 1
            jobs.add(environment["SLURM_JOB_ID"])
    assert jobs, "no stage ran in a Slurm job"
    scripts = list((site / "onslurm" / ".cruijff" / "slurm").glob("*.out"))
    assert scripts, "worker job logs belong in the experiment folder"


SLOW_FINETUNE = ["--control", "torchtune.epochs=3", "--control", "eval.limit=2"]


def start_and_cancel_first_finetune(site, name: str, env: dict,
                                    *extra: str) -> tuple[subprocess.Popen, str]:
    """Start `cruijff run` and scancel the Slurm job of trial a's fine-tune while it trains."""
    build = cruijff("build", *build_args(site, name, *extra, fast=SLOW_FINETUNE), env=env)
    assert build.returncode == 0, build.stderr
    proc = subprocess.Popen([sys.executable, "-m", "cruijff", "run", "-q", str(site / name)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trial = site / name / "trial-a"

    def training_job():
        record = read_record(trial, "finetune")
        log = trial / "logs" / "finetune-attempt1.log"
        if record and record.status == "running" and log.exists() and "loss" in log.read_text(
                errors="replace"):
            return record.environment.get("SLURM_JOB_ID")
        return None

    job = wait_for(training_job, 240, "the fine-tune to train in a Slurm job")
    subprocess.run(["scancel", job], check=True)
    return proc, job


def test_a_cancelled_job_is_retried_on_a_new_job(slurm_site, prefect_env):
    site = slurm_site(retries=1)
    proc, job = start_and_cancel_first_finetune(site, "cancelled", prefect_env)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    record = read_record(site / "cancelled" / "trial-a", "finetune")
    assert record.status == "done" and record.attempts == 2
    assert record.history[0]["where"] == f"slurm:{job}"
    assert record.where.startswith("slurm:") and record.where != f"slurm:{job}"
    assert read_record(site / "cancelled" / "trial-a", "eval").status == "done"


def test_exhausted_retries_fail_the_trial_not_the_others(slurm_site, prefect_env):
    site = slurm_site(retries=0)
    proc, job = start_and_cancel_first_finetune(site, "exhausted", prefect_env,
                                                "--treatment", "use_fine_tune=false")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, output
    record = read_record(site / "exhausted" / "trial-a", "finetune")
    assert record.status in ("failed", "running")
    assert read_record(site / "exhausted" / "trial-a", "eval") is None

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async def states():
        async with PrefectClient(api=prefect_env["PREFECT_API_URL"]) as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=["exp:exhausted"])))
            return {run.name: run.state_type.value for run in runs}

    assert asyncio.run(states()) == {"exhausted": "FAILED", "exhausted/trial-a": "FAILED",
                                     "exhausted/trial-b": "COMPLETED"}, output
    assert read_record(site / "exhausted" / "trial-b", "eval").status == "done"
    sacct = subprocess.run(["sacct", "-c", "-n", "-X", "-j", job, "-o", "State"],
                           capture_output=True, text=True)
    assert "CANCELLED" in sacct.stdout
    summary = cruijff("summary", "--json", site / "exhausted", env=prefect_env)
    assert summary.returncode == 1
    import json

    trial_a = json.loads(summary.stdout)["trials"][0]
    assert trial_a["stages"]["finetune"]["state"] in ("failed", "interrupted")
    assert f"{job}: CANCELLED" in trial_a["stages"]["finetune"]["slurm"]
    assert trial_a["prefect"] == "Failed"
