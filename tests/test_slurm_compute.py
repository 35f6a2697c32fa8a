"""What stage attempts used, on the real single-node Slurm with accounting (slurmdbd): every
figure recorded, sacct's step matched to the right attempt, a stage that allocates past its
job's memory recorded as OUT_OF_MEMORY, and with grow_on_oom retried with more memory and
completing. The stage is the `testing_compute` double: it holds a chosen amount of memory."""

from __future__ import annotations

import json
import re

import pytest
from conftest import cruijff, make_site
from slurm_support import require_slurm, require_slurm_accounting

from cruijff.state import read_record

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
TINY = "cruijff/tiny-llama-random"
COMPUTE = "testing_compute"
CONFIG = """pipeline: [testing_compute]
run_control_trials: false
orchestration: {{executor: slurm, retries: {retries}, max_jobs: 2{grow}}}
resources:
  default: {{time: "00:10:00", mem: 1}}
"""


def run(tmp_path, model, env, name: str, treatments: list[dict], *, retries: int,
        grow: str = ""):
    require_slurm()
    require_slurm_accounting()
    site = make_site(tmp_path, model, CONFIG.format(retries=retries, grow=grow))
    result = cruijff("run", "--config-path", site / "config.yaml", "--root", site, "--name",
                     name, "--task", "capitalization", "--dataset", "words_5L_80_1000.json",
                     "--model", TINY, "--treatments", json.dumps(treatments), env=env)
    return site / name, result


def test_every_figure_of_each_attempt_is_recorded_and_matched_to_its_step(
        tmp_path, tiny_random_model, prefect_env):
    exp, result = run(tmp_path, tiny_random_model, prefect_env, "figures", [
        {f"{COMPUTE}.allocate_mb": 300, f"{COMPUTE}.hold_s": 3, f"{COMPUTE}.cpu_s": 1},
        {f"{COMPUTE}.allocate_mb": 50, f"{COMPUTE}.hold_s": 3}], retries=0)
    assert result.returncode == 0, result.stdout + result.stderr
    for trial, allocated in (("a", 300), ("b", 50)):
        record = read_record(exp / f"trial-{trial}", COMPUTE)
        assert record.status == "done" and record.outcome is None
        usage, slurm = record.usage, record.slurm
        assert usage.final and usage.peak_rss_mib >= allocated and usage.wall_s >= 3
        assert slurm.job_id == record.where.removeprefix("slurm:")
        assert slurm.source == "sacct" and slurm.state == "COMPLETED"
        log = (exp / f"trial-{trial}" / record.log).read_text()
        assert f"SLURM_STEP_ID={slurm.step_id}" in log  # sacct's step is this attempt's
        assert slurm.requested == {"mem_mib": 1024, "time_s": 600, "cpus": 1}
        assert slurm.max_rss_mib is not None
        assert abs(slurm.max_rss_mib - usage.peak_rss_mib) <= 0.35 * usage.peak_rss_mib
        assert slurm.total_cpu_s is not None and slurm.elapsed_s >= 3
    cpu = read_record(exp / "trial-a", COMPUTE)
    assert cpu.usage.cpu_s >= 1 and cpu.slurm.total_cpu_s >= 1


def test_an_attempt_past_its_memory_is_out_of_memory_and_grows_with_grow_on_oom(
        tmp_path, tiny_random_model, prefect_env):
    exp, result = run(tmp_path, tiny_random_model, prefect_env, "grows",
                      [{f"{COMPUTE}.allocate_mb": 1400, f"{COMPUTE}.hold_s": 6}], retries=1,
                      grow=", grow_on_oom: {factor: 2, max_mem: 2}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"trial a testing_compute OUT_OF_MEMORY at \d\.\d/1G.*; retrying with "
                     r"mem 2G \(grow_on_oom ×2, cap 2G\)", output), output
    record = read_record(exp / "trial-a", COMPUTE)
    assert record.status == "done" and record.attempts == 2 and record.grown == {"mem": 2}
    assert record.slurm.requested["mem_mib"] == 2048
    assert "mem=2048M" in (record.slurm.alloc_tres or ""), record.slurm  # the new job
    first = record.history[0]
    assert first["outcome"] == "OUT_OF_MEMORY" and first["requested"]["mem_mib"] == 1024
    assert first["peak_rss_mib"] >= 900
    summary = cruijff("summary", exp, env=prefect_env)
    assert "OUT_OF_MEMORY" in summary.stdout, summary.stdout


def test_without_grow_on_oom_the_trial_fails_as_out_of_memory(tmp_path, tiny_random_model,
                                                               prefect_env):
    exp, result = run(tmp_path, tiny_random_model, prefect_env, "nogrow",
                      [{f"{COMPUTE}.allocate_mb": 1400, f"{COMPUTE}.hold_s": 6}], retries=0)
    assert result.returncode == 1, result.stdout + result.stderr
    record = read_record(exp / "trial-a", COMPUTE)
    assert record.status == "failed" and record.outcome == "OUT_OF_MEMORY"
    assert record.error.startswith("OUT_OF_MEMORY at ")
    assert record.slurm.state in ("OUT_OF_MEMORY", "CANCELLED", "FAILED")
    summary = json.loads(cruijff("summary", "--json", exp, env=prefect_env).stdout)
    assert "OUT_OF_MEMORY" in json.dumps(summary["trials"][0])
