"""Deployments: `cruijff serve` runs what `cruijff run` triggers; failed trials are re-run by
the re-run deployment (scheduled with `cruijff schedule-reruns`), completed stages are not."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
from conftest import EXAMPLE, cruijff, make_site

from cruijff.state import read_record

pytestmark = pytest.mark.slow
TINY = "cruijff/tiny-llama-random"
FAULTY_EVAL = '''

@task
def flaky(data_path: str, data_ext: str = "json", split: str = "test", fault_file: str = ""):
    """The capitalization task, failing while `fault_file` exists (an injected fault)."""
    if fault_file and Path(fault_file).exists():
        raise RuntimeError("injected fault")
    return capitalization(data_path, data_ext, split)
'''


@pytest.fixture(scope="module")
def served(prefect_env):
    """`cruijff serve` in the background, until the experiment deployment is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "cruijff", "serve"], env=prefect_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = subprocess.run([sys.executable, "-c", "from cruijff.deployments.client import "
                                "served_experiment_deployment as s; print(s() or '')"],
                               env=prefect_env, capture_output=True, text=True)
        if found.stdout.strip():
            break
        assert proc.poll() is None, "cruijff serve exited"
        time.sleep(1)
    else:
        pytest.fail("the experiment deployment never became ready")
    yield UUID(found.stdout.strip())
    proc.terminate()
    proc.wait(timeout=30)
    from prefect.client.orchestration import PrefectClient

    async def forget() -> None:  # later tests on this server must not find them served
        async with PrefectClient(api=prefect_env["PREFECT_API_URL"]) as client:
            for name in ("cruijff-experiment/run", "cruijff-rerun/rerun-failed"):
                deployment = await client.read_deployment_by_name(name)
                await client.delete_deployment(deployment.id)

    asyncio.run(forget())


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_random_model):
    root = make_site(tmp_path_factory.mktemp("deploy"), tiny_random_model)
    tasks = root / "tasks"
    shutil.copytree(EXAMPLE / "tasks", tasks)
    (root / "config.yaml").write_text((root / "config.yaml").read_text().replace(
        f"tasks_dir: {EXAMPLE / 'tasks'}", f"tasks_dir: {tasks}")
        + "orchestration: {retries: 0}\n")
    shutil.copytree(tasks / "capitalization", tasks / "flaky")
    source = (tasks / "flaky" / "eval.py").read_text().replace("@task\ndef capitalization",
                                                               "def capitalization")
    (tasks / "flaky" / "eval.py").write_text(source + FAULTY_EVAL)
    return root


def flow_run(env: dict, run_id: str):
    from prefect.client.orchestration import PrefectClient

    async def read():
        async with PrefectClient(api=env["PREFECT_API_URL"]) as client:
            return await client.read_flow_run(UUID(run_id))

    return asyncio.run(read())


def build(site, env, name: str, *extra: str) -> None:
    result = cruijff("build", "--config-path", site / "config.yaml", "--root", site, "--name",
                     name, "--task", "flaky", "--dataset", "words_5L_80_1000.json", "--model",
                     TINY, "--control", "use_fine_tune=false", "--control", "eval.limit=2",
                     *extra, env=env)
    assert result.returncode == 0, result.stderr


def test_run_goes_through_the_served_deployment(served, site, prefect_env):
    build(site, prefect_env, "viaserve", "--treatment", "eval.limit=1")
    result = cruijff("run", site / "viaserve", env=prefect_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Triggered deployment run" in result.stderr
    run_id = result.stderr.split("Triggered deployment run ")[1].split(":")[0]
    assert flow_run(prefect_env, run_id).deployment_id == served
    assert read_record(site / "viaserve" / "trial-b", "eval").status == "done"


def build_held(site, env, name: str, release) -> Path:
    """An experiment of one `testing_touch` stage that runs until the file `release` exists."""
    config = site / "touch.yaml"
    config.write_text((site / "config.yaml").read_text()
                      + "pipeline: [testing_touch]\nrun_control_trials: false\n")
    built = cruijff("build", "--config-path", config, "--root", site, "--name", name,
                    "--task", "capitalization", "--dataset", "words_5L_80_1000.json",
                    "--model", TINY, "--treatment", f"testing_touch.wait_for={release}",
                    env=env)
    assert built.returncode == 0, built.stderr
    return site / name


def test_no_wait_returns_the_flow_run_id_while_the_run_goes_on(served, site, prefect_env,
                                                               tmp_path):
    """`run --no-wait` returns once the served deployment has the flow run, not when the run
    ends: here its stage waits for a file that does not exist yet, so a `--no-wait` that
    waited would never return (the timeout only guards against that hang). How fast it
    returns: benchmarks/no_wait_latency.py."""
    release = tmp_path / "release"
    exp = build_held(site, prefect_env, "nowait", release)
    try:
        result = cruijff("run", "--no-wait", exp, env=prefect_env, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        run_id = result.stdout.strip()
        run = flow_run(prefect_env, str(UUID(run_id)))
        assert run.deployment_id == served
        assert not run.state.is_final(), run.state  # scheduled, pending or running
        record = read_record(exp / "trial-a", "testing_touch")
        assert record is None or record.status != "done", record
    finally:
        release.touch()  # (a failed check must not leave the served runner busy)
    deadline = time.monotonic() + 180
    while not (state := flow_run(prefect_env, run_id).state).is_final():
        assert time.monotonic() < deadline, state
        time.sleep(1)
    assert state.is_completed(), state
    assert read_record(exp / "trial-a", "testing_touch").status == "done"


def test_failed_trials_are_rerun_by_the_rerun_deployment(served, site, prefect_env, tmp_path):
    fault = tmp_path / "FAULT"
    fault.write_text("on")
    build(site, prefect_env, "rerun", "--treatment", f"eval.fault_file={fault}")
    first = cruijff("run", site / "rerun", env=prefect_env)  # on the served deployment
    assert first.returncode == 1
    assert "Triggered deployment run" in first.stderr
    assert "trial b eval failed: " in first.stderr, first.stderr  # why, as a local run says
    assert read_record(site / "rerun" / "trial-b", "eval").status == "failed"
    done_before = sorted((site / "rerun").glob("trial-a/logs/*-attempt*.log"))

    scheduled = cruijff("schedule-reruns", site / "rerun", "--cron", "*/5 * * * *",
                        env=prefect_env)
    assert scheduled.returncode == 0, scheduled.stderr

    from prefect.client.orchestration import PrefectClient
    from prefect.deployments import run_deployment

    async def schedules():
        async with PrefectClient(api=prefect_env["PREFECT_API_URL"]) as client:
            deployment = await client.read_deployment_by_name("cruijff-rerun/rerun-failed")
            return [(s.schedule.cron, s.parameters) for s in deployment.schedules]

    assert ("*/5 * * * *", {"experiment": str(site / "rerun")}) in asyncio.run(schedules())
    bad = cruijff("schedule-reruns", site / "rerun", "--cron", "*/5 25 * * *", env=prefect_env)
    assert bad.returncode == 2 and "hour field '25': 25 is outside 0-23" in bad.stderr
    assert ("*/5 * * * *", {"experiment": str(site / "rerun")}) in asyncio.run(schedules())

    fault.unlink()  # the fault is fixed; the scheduled run is triggered now instead of waiting
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
        run = run_deployment("cruijff-rerun/rerun-failed",
                             parameters={"experiment": str(site / "rerun")}, timeout=240)
    assert run.state.is_completed(), run.state
    record = read_record(site / "rerun" / "trial-b", "eval")
    assert record.status == "done" and record.attempts == 2
    assert sorted((site / "rerun").glob("trial-a/logs/*-attempt*.log")) == done_before
    again = cruijff("run", site / "rerun", "--local", env=prefect_env)
    assert again.returncode == 0 and "already complete" in again.stdout

    off = cruijff("schedule-reruns", site / "rerun", "--off", env=prefect_env)
    assert off.returncode == 0 and asyncio.run(schedules()) == []


def test_ctrl_c_while_waiting_on_a_served_run_stops_that_run(served, site, prefect_env,
                                                            tmp_path):
    """Ctrl-C on `cruijff run` that triggered the served deployment cancels the flow run
    there; its runner SIGTERMs it, and it stops as cleanly as a local run (the stage recorded
    interrupted, the flow run Cancelled); `cruijff run` then resumes."""
    release = tmp_path / "release"
    exp = build_held(site, prefect_env, "served-stop", release)
    run = subprocess.Popen([sys.executable, "-m", "cruijff", "run", "-q", str(exp)],
                           env=prefect_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)

    def stage_status() -> str | None:
        record = read_record(exp / "trial-a", "testing_touch")
        return record.status if record else None

    deadline = time.monotonic() + 120
    while stage_status() != "running":
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.5)
    os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130, out + err
    # It returns once the served run has ended, so the experiment is free for the next run.
    stopping = re.search(r"asked the served deployment to cancel flow run ([0-9a-f-]{36})", err)
    assert stopping and "Stopped: `cruijff run` resumes" in err, err
    assert flow_run(prefect_env, stopping[1]).state.is_cancelled()
    assert stage_status() == "interrupted"
    release.touch()
    again = cruijff("run", "--local", exp, env=prefect_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert stage_status() == "done"


def test_deploy_registers_both_deployments_on_a_process_pool(tmp_path):
    """On its own server: registering on a pool replaces what `cruijff serve` serves."""
    import os

    from cruijff.flows.server import start_server, stop_server

    info = start_server(tmp_path / "home")
    try:
        env = dict(os.environ, CRUIJFF_HOME=str(tmp_path / "home"), PREFECT_API_URL=info.url)
        result = cruijff("deploy", "--pool", "hpc", env=env)
        assert result.returncode == 0, result.stderr
        assert "prefect worker start --pool hpc" in result.stdout

        from prefect.client.orchestration import PrefectClient

        async def read():
            async with PrefectClient(api=info.url) as client:
                pool = await client.read_work_pool("hpc")
                deployments = [await client.read_deployment_by_name(name) for name in
                               ("cruijff-experiment/run", "cruijff-rerun/rerun-failed")]
                return pool, deployments

        pool, deployments = asyncio.run(read())
        assert pool.type == "process"
        assert [d.work_pool_name for d in deployments] == ["hpc", "hpc"]
        assert deployments[0].entrypoint == "cruijff.flows.experiment.experiment_flow"
    finally:
        stop_server(tmp_path / "home")
