"""The dev/CI Slurm cluster (scripts/slurm/start.sh) is real: resources, time limits, scancel."""

from __future__ import annotations

import subprocess
import time

import pytest
from slurm_support import (
    require_slurm,
    requires_slurm,
    sbatch,
    timeout_probe,
    wait_for_job,
    wait_for_state,
)

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def timeout_job(tmp_path_factory):
    """A job that outlives its time limit, submitted when this module starts (or earlier).

    It ends 60-90 s after it starts (see slurm_support.timeout_probe); the other tests here run
    meanwhile and the test that checks it comes last.
    """
    require_slurm()
    job, submitted = timeout_probe(tmp_path_factory.mktemp("slurm-timeout"))
    yield job, submitted
    subprocess.run(["scancel", str(job)], capture_output=True)


@pytest.fixture(autouse=True)
def _start_timeout_job_first(timeout_job):
    """Every test here requests it, so the long job starts before the first test."""


@requires_slurm
def test_batch_job_gets_gpus_and_memory(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text('#!/bin/bash\nenv > "$1"\n')
    env_file = tmp_path / "env.txt"
    job = sbatch(["--gres=gpu:2", "--mem=1G", "--time=00:02:00", f"--output={tmp_path}/%j.out",
                  str(script), str(env_file)], cwd=tmp_path)

    done = wait_for_job(job, timeout=60)

    assert done.state == "COMPLETED", done
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    assert env["SLURM_JOB_ID"] == str(job)
    assert len(env["CUDA_VISIBLE_DEVICES"].split(",")) == 2, env["CUDA_VISIBLE_DEVICES"]
    assert len(env["SLURM_JOB_GPUS"].split(",")) == 2, env["SLURM_JOB_GPUS"]
    assert env["SLURM_MEM_PER_NODE"] == "1024"


@requires_slurm
def test_scancel_of_a_running_job_gives_cancelled(tmp_path):
    job = sbatch(["--mem=50M", f"--output={tmp_path}/%j.out", "--wrap", "sleep 120"],
                 cwd=tmp_path)
    wait_for_state(job, {"RUNNING"}, timeout=30)

    subprocess.run(["scancel", str(job)], check=True)

    done = wait_for_job(job, timeout=30)
    assert done.state == "CANCELLED", done


@requires_slurm
def test_job_over_its_time_limit_ends_in_timeout(timeout_job):
    job, submitted = timeout_job
    # Limit 1 min (rounded up from 5 s) + up to 30 s until slurmctld's next check + KillWait.
    done = wait_for_job(job, timeout=max(5.0, 150 - (time.monotonic() - submitted)), poll=1)
    assert done.state == "TIMEOUT", done
    assert done.elapsed_s >= 60, done
