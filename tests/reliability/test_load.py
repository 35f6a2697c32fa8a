"""Load: 200 trials through the real Prefect server and Dask, with the `testing_touch` test-double
stage (it only writes a file), so what is measured is cruijff's orchestration, not training."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from conftest import cruijff

from cruijff.state import read_record

TRIALS = 200
PEAK = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
        "file=sys.stderr); sys.exit(p.returncode)")


async def trial_flow_runs(api: str, experiment: str) -> list:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterTags,
    )

    runs: list = []
    async with PrefectClient(api=api) as client:
        while True:
            page = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["cruijff-trial"])),
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"exp:{experiment}"])),
                limit=200, offset=len(runs))
            runs += page
            if len(page) < 200:
                return runs


def test_200_trials_of_a_trivial_stage_through_prefect_and_dask(project, prefect_env):
    project.config.write_text(project.config.read_text().replace(
        "run_control_trials: true", "run_control_trials: false") + "pipeline: [testing_touch]\n")
    treatments = json.dumps({"testing_touch.index": list(range(TRIALS))})
    built = cruijff("build", "--config-path", project.config, "--task", "toy",
                    "--model", "cruijff/tiny-llama-random", "--dataset", "d.json",
                    "--treatments", treatments, "--name", "load",
                    "--root", project.experiments, env=prefect_env)
    assert built.returncode == 0, built.stderr
    exp = project.experiments / "load"
    assert len(list(exp.glob("trial-*"))) == TRIALS

    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "cruijff", "run",
                          "--workers", "4", exp], env=prefect_env, capture_output=True,
                         text=True, timeout=900)
    wall = time.monotonic() - start
    peak_mb = int(run.stderr.rsplit("peak_rss_kb", 1)[1].split()[0]) / 1024
    print(f"\n{TRIALS} trials: wall {wall:.1f} s, peak RSS {peak_mb:.0f} MB")
    records = {trial: read_record(trial, "testing_touch") for trial in exp.glob("trial-*")}
    not_done = sorted(t.name for t, r in records.items() if r is None or r.status != "done")
    assert run.returncode == 0, f"not done: {not_done}\n{run.stderr[-3000:]}"
    assert "database is locked" not in run.stdout + run.stderr

    assert not not_done
    for trial in records:
        assert (trial / "touch" / "output.txt").read_text().split()[0] == trial.name[6:]

    summary = cruijff("summary", "--json", exp, env=prefect_env)
    assert summary.returncode == 0, summary.stderr
    trials = json.loads(summary.stdout)["trials"]
    assert len(trials) == TRIALS
    assert all(t["stages"]["testing_touch"]["state"] == "done" for t in trials)

    runs = asyncio.run(trial_flow_runs(prefect_env["PREFECT_API_URL"], "load"))
    assert sorted(r.name for r in runs) == sorted(f"load/{t.name}" for t in exp.glob("trial-*"))
    assert {r.state.type.value for r in runs} == {"COMPLETED"}
