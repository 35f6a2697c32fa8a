"""What each stage attempt used, in the Prefect task run: one log line and a table artifact,
read back through the Prefect client (a real server; the `testing_touch` test double as the
stage, so what is checked is the view, not training)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from conftest import cruijff

from cruijff.state import StageRecord, Usage

pytestmark = pytest.mark.slow
TOUCH = "testing_touch"


async def stage_runs(api: str, experiment: str) -> tuple[dict, dict, dict]:
    """(task runs by name, their log messages, the compute artifacts by key): logs reach the
    server in batches, so this waits (up to 60 s) until every stage run has its line."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        LogFilter,
        LogFilterTaskRunId,
        TaskRunFilter,
        TaskRunFilterTags,
    )

    async with PrefectClient(api=api) as client:
        deadline = time.monotonic() + 60
        while True:
            tasks = {t.name: t for t in await client.read_task_runs(
                task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=[f"exp:{experiment}"])))
                if t.name.startswith("trial-")}
            logs = await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(
                any_=[t.id for t in tasks.values()])))
            messages = {name: [log.message for log in logs if log.task_run_id == t.id]
                        for name, t in tasks.items()}
            if len(tasks) == 3 and all(any("used:" in m for m in v) for v in messages.values()):
                break
            assert time.monotonic() < deadline, f"no usage line in some of {messages}"
            await asyncio.sleep(0.5)
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(like_="compute-")))
    by_key: dict[str, list] = {}
    for artifact in artifacts:
        by_key.setdefault(artifact.key, []).append(artifact)
    return tasks, messages, by_key


def test_each_stage_run_logs_what_it_used_and_publishes_a_table(project, prefect_env):
    project.config.write_text(project.config.read_text().replace(
        "run_control_trials: true", "run_control_trials: false")
        + f"pipeline: [{TOUCH}]\norchestration: {{retries: 1}}\n")
    treatments = json.dumps([{f"{TOUCH}.index": 1}, {f"{TOUCH}.exit_code": 3}])
    built = cruijff("build", "--config-path", project.config, "--task", "toy",
                    "--model", "cruijff/tiny-llama-random", "--dataset", "d.json",
                    "--treatments", treatments, "--name", "Usage_View",
                    "--root", project.experiments, env=prefect_env)
    assert built.returncode == 0, built.stderr
    run = cruijff("run", project.experiments / "Usage_View", env=prefect_env)
    assert run.returncode == 1, run.stdout + run.stderr  # trial b fails on purpose, twice

    tasks, messages, artifacts = asyncio.run(
        stage_runs(prefect_env["PREFECT_API_URL"], "Usage_View"))
    assert sorted(tasks) == [f"trial-a/{TOUCH} attempt 1", f"trial-b/{TOUCH} attempt 1",
                             f"trial-b/{TOUCH} attempt 2"]
    line = next(m for m in messages[f"trial-a/{TOUCH} attempt 1"] if "used:" in m)
    assert re.fullmatch(rf"trial a {TOUCH} used: wall [\d.]+s, CPU [\d.]+s, peak RSS \d+M", line)
    assert any("used:" in m for m in messages[f"trial-b/{TOUCH} attempt 2"])  # failed: shown too

    key_a, key_b = (f"compute-usage-view-{t}-testing-touch" for t in "ab")
    assert sorted(k for k in artifacts if k in (key_a, key_b)) == [key_a, key_b]
    assert len(artifacts[key_b]) == 2  # one version per attempt
    [a] = artifacts[key_a]
    assert a.type == "table" and a.task_run_id == tasks[f"trial-a/{TOUCH} attempt 1"].id
    rows = json.loads(a.data) if isinstance(a.data, str) else a.data
    assert [(r["trial"], r["stage"], r["attempt"], r["status"]) for r in rows] == [
        ("a", TOUCH, "1", "done")]
    assert rows[0]["wall"].endswith("s") and rows[0]["peak RSS"].endswith("M")  # measured
    attempts = sorted(json.loads(x.data)[0]["attempt"] if isinstance(x.data, str)
                      else x.data[0]["attempt"] for x in artifacts[key_b])
    assert attempts == ["1", "2"]

    summary = cruijff("summary", project.experiments / "Usage_View",
                      env={**prefect_env, "COLUMNS": "200"})
    assert re.search(rf"│ {TOUCH} \d+M · [\d.]+s +│", summary.stdout), summary.stdout


def test_a_refused_artifact_never_fails_the_stage(prefect_env, monkeypatch):
    """The server answers HTTP 503 to the artifact: the task run still completes, and says
    why there is no table."""
    import cruijff.flows.experiment as flows
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def busy(*args, **kwargs):
        request = httpx.Request("POST", "http://prefect/api/artifacts/")
        raise PrefectHTTPStatusError("Service Unavailable", request=request,
                                     response=httpx.Response(503, request=request))

    monkeypatch.setattr(flows, "create_table_artifact", busy)
    record = StageRecord(TOUCH, "k", "done", usage=Usage(wall_s=3.0, peak_rss_mib=120.0))

    @task(name="show")
    def show() -> str:
        flows._show_use("exp", "a", record)
        from prefect.context import TaskRunContext

        return str(TaskRunContext.get().task_run.id)

    @flow(name="refused-artifact")
    def one() -> str:
        return show()

    with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
        state = one(return_state=True)
        assert state.is_completed()
        task_run_id = state.result()

        async def messages() -> list[str]:
            async with get_client() as client:
                deadline = time.monotonic() + 60
                while True:
                    logs = await client.read_logs(log_filter=LogFilter(
                        task_run_id=LogFilterTaskRunId(any_=[task_run_id])))
                    if any("no compute artifact" in log.message for log in logs):
                        return [log.message for log in logs]
                    assert time.monotonic() < deadline, [log.message for log in logs]
                    await asyncio.sleep(0.5)

        found = asyncio.run(messages())
    assert any(m.startswith("trial a testing_touch used: wall 3s, peak RSS 120M")
               for m in found)
    assert any("no compute artifact for trial a testing_touch: Service Unavailable" in m
               for m in found)


def test_outside_a_run_there_is_nothing_to_show_and_nothing_fails():
    import cruijff.flows.experiment as flows

    flows._show_use("exp", "a", StageRecord(TOUCH, "k", "done", usage=Usage(wall_s=1.0)))
