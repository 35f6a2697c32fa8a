"""The scheduler through Prefect and Dask (a real server, `cruijff run` as a user runs it):
trials waiting for another's shared stage hold no place, so a runnable trial beyond the
run's places (twice the workers) starts beside the shared stage's owner. The test doubles
wait for a file the test creates, so the ordering asserted is caused, not timed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import cruijff

from cruijff.state import read_record

pytestmark = pytest.mark.slow
TOUCH, SHARED = "testing_touch", "testing_shared"


def test_waiting_trials_leave_the_workers_to_a_runnable_one(project, prefect_env, tmp_path):
    """Two workers, so four places. a to e share one stage that one of them runs and cannot
    finish until the test releases it; f's stage is its own. Before, three of the others held
    the other places while they waited, and f could not start until the shared stage ended;
    now f finishes beside it."""
    release = tmp_path / "release"
    project.config.write_text(project.config.read_text().replace(
        "run_control_trials: true", "run_control_trials: false")
        + f"pipeline: [{SHARED}, {TOUCH}]\norchestration: {{retries: 0}}\n")
    treatments = [{f"{SHARED}.wait_for": str(release), f"{TOUCH}.index": i} for i in range(5)]
    treatments.append({f"{SHARED}.index": 9, f"{TOUCH}.index": 9})
    built = cruijff("build", "--config-path", project.config, "--task", "toy",
                    "--model", "cruijff/tiny-llama-random", "--dataset", "d.json",
                    "--treatments", json.dumps(treatments), "--name", "Places",
                    "--root", project.experiments, env=prefect_env)
    assert built.returncode == 0, built.stderr
    exp = project.experiments / "Places"
    run = subprocess.Popen([sys.executable, "-m", "cruijff", "run", exp, "--workers", "2"],
                           env=prefect_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        deadline = time.monotonic() + 300
        while (r := read_record(exp / "trial-f", TOUCH)) is None or r.status != "done":
            assert run.poll() is None, run.stdout.read() if run.stdout else ""
            assert time.monotonic() < deadline, "f never finished before the release"
            time.sleep(0.2)
        # f is done before the release, so it did not wait for the shared stage. That stage's
        # owner (whichever of a-e claimed it first) may still be on its way to its worker
        # (Prefect's task submission can take longer than f's two quick stages): it runs
        # until the release, so it is seen running.
        def running() -> list[str]:
            return [t for t in "abcde" if (r := read_record(exp / f"trial-{t}", SHARED))
                    and r.status == "running"]

        while not running():
            assert run.poll() is None, run.stdout.read() if run.stdout else ""
            assert time.monotonic() < deadline, "no trial ever ran the shared stage"
            time.sleep(0.2)
        owners = running()
        assert len(owners) == 1, owners
    finally:
        release.touch()
        out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    owner = owners[0]
    for trial in "abcde":
        record = read_record(exp / f"trial-{trial}", SHARED)
        assert record.reused_from == (None if trial == owner else owner)
        assert read_record(exp / f"trial-{trial}", TOUCH).status == "done"
