"""How a run went, read in Prefect: each stage attempt's log lines in its task run, the
attempts named and tagged, and the run's results as artifacts of the experiment's flow run.

One small experiment through a real Prefect server: `testing_touch` (trial a's fails once,
trial b's always) before a real Inspect eval of the tiny random model on two samples. The
Prefect UI itself is looked at in headless Chromium (see browser_support.py)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
from browser_support import chromium, run_chromium
from conftest import cruijff, make_site

from cruijff.log_tail import excerpt
from cruijff.state import read_record

TOUCH = "testing_touch"
NAME = "Seen_In_Prefect"


def test_an_excerpt_is_the_tail_after_the_earlier_errors_and_is_bounded(tmp_path):
    log = tmp_path / "x.log"
    lines = [f"step {i}" for i in range(1, 301)]
    lines[9] = "Traceback (most recent call last):"
    lines[19] = "ValueError: the earlier cause"
    lines[-1] = "x" * 900
    lines[-2] = "\rprogress 10%\rprogress 100%\r"
    log.write_text("\n".join(lines) + "\n\n")
    shown = excerpt(log, tail=5, limit=8, width=100)
    assert shown is not None and shown.total == 300
    assert shown.lines == ["… 9 lines not shown …", "Traceback (most recent call last):",
                           "… 9 lines not shown …", "ValueError: the earlier cause",
                           "… 275 lines not shown …", "step 296", "step 297", "step 298",
                           "progress 100%", "x" * 100 + " …"]
    assert shown.header("logs/x.log") == (
        "logs/x.log: the last 5 of 300 lines and 2 earlier error lines")
    many = excerpt(log, tail=5, limit=6)  # room for one earlier error: the latest
    assert many is not None and many.lines[:2] == ["… 19 lines not shown …",
                                                    "ValueError: the earlier cause"]
    short = tmp_path / "short.log"
    short.write_text("one\ntwo\n")
    assert excerpt(short).lines == ["one", "two"]
    assert excerpt(short).header() == f"{short}: all 2 lines"
    assert excerpt(tmp_path / "missing.log") is None


def test_outside_a_run_publishing_does_nothing(tmp_path):
    from cruijff.flows.artifacts import publish
    from cruijff.flows.stage_logs import show_attempt_log

    publish(None)  # type: ignore[arg-type]  # not even looked at: there is no run context
    show_attempt_log(tmp_path, read_record(tmp_path, TOUCH))


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_random_model, prefect_env) -> Path:
    site = make_site(tmp_path_factory.mktemp("site"), tiny_random_model,
                     "run_control_trials: false\nuse_fine_tune: false\n"
                     f"pipeline: [{TOUCH}, eval]\norchestration: {{retries: 1}}\n")
    once = site / "failed-once"
    treatments = json.dumps([{f"{TOUCH}.fail_once": str(once)}, {f"{TOUCH}.exit_code": 3}])
    built = cruijff("build", "--config-path", site / "config.yaml", "--root", site,
                    "--name", NAME, "--task", "capitalization",
                    "--dataset", "words_5L_80_1000.json", "--model", "cruijff/tiny-llama-random",
                    "--control", "eval.limit=2", "--treatments", treatments, env=prefect_env)
    assert built.returncode == 0, built.stderr
    run = cruijff("run", site / NAME, env=prefect_env)
    assert run.returncode == 1, run.stdout + run.stderr  # trial b fails on purpose, twice
    return site / NAME


async def _read(api: str, read):
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api=api) as client:
        return await read(client)


def stage_runs(api: str) -> tuple[dict, dict[str, list]]:
    """(stage task runs by name, their log entries): task runs and logs reach the server in
    batches, so this waits (up to 60 s) until each of the five attempts has its log lines."""
    from prefect.client.schemas.filters import (
        LogFilter,
        LogFilterTaskRunId,
        TaskRunFilter,
        TaskRunFilterTags,
    )

    async def read(client):
        deadline = time.monotonic() + 60
        while True:
            tasks = {t.name: t for t in await client.read_task_runs(
                task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=[f"exp:{NAME}"])))
                if t.name.startswith("trial-")}
            logs = await client.read_logs(log_filter=LogFilter(
                task_run_id=LogFilterTaskRunId(any_=[t.id for t in tasks.values()])))
            entries = {name: [log for log in logs if log.task_run_id == t.id]
                       for name, t in tasks.items()}
            if len(tasks) == 5 and all(any(".log: " in e.message for e in v)
                                       for v in entries.values()):
                return tasks, entries
            assert time.monotonic() < deadline, sorted(tasks)
            await asyncio.sleep(0.5)

    return asyncio.run(_read(api, read))


@pytest.mark.slow
def test_each_attempt_is_a_task_run_named_and_tagged_with_its_number(ran, prefect_env):
    tasks, _ = stage_runs(prefect_env["PREFECT_API_URL"])
    assert sorted(tasks) == sorted([f"trial-a/{TOUCH} attempt 1", f"trial-a/{TOUCH} attempt 2",
                                    "trial-a/eval attempt 1", f"trial-b/{TOUCH} attempt 1",
                                    f"trial-b/{TOUCH} attempt 2"])
    for name, task_run in tasks.items():
        trial, stage, attempt = re.fullmatch(r"trial-(\w)/(\w+) attempt (\d)", name).groups()
        assert {f"trial:{trial}", f"stage:{stage}", f"attempt:{attempt}"} <= set(task_run.tags)
    states = {name: t.state_type.value for name, t in tasks.items()}
    assert states[f"trial-a/{TOUCH} attempt 1"] == "FAILED"
    assert states[f"trial-a/{TOUCH} attempt 2"] == "COMPLETED"
    assert states[f"trial-b/{TOUCH} attempt 2"] == "FAILED"


@pytest.mark.slow
def test_each_attempt_logs_its_log_lines_and_a_failure_its_error(ran, prefect_env):
    _, entries = stage_runs(prefect_env["PREFECT_API_URL"])
    messages = {name: [e.message for e in v] for name, v in entries.items()}

    eval_log = ran / "trial-a" / "logs" / "eval-attempt1.log"
    tail = [line.rstrip() for line in eval_log.read_text().splitlines() if line.strip()][-3:]
    assert tail and all(line[:500] in messages["trial-a/eval attempt 1"] for line in tail)
    assert any(m.startswith("eval done; logs/eval-attempt1.log: ")
               for m in messages["trial-a/eval attempt 1"])

    failing = f"{TOUCH}: failing on purpose with exit code 3"
    for attempt in (1, 2):
        name = f"trial-b/{TOUCH} attempt {attempt}"
        assert failing in messages[name]
        header = next(e for e in entries[name] if ".log: " in e.message)
        assert header.level >= 40  # ERROR: the UI's level filter finds a failed attempt
        assert header.message.startswith(f"{TOUCH} failed; logs/{TOUCH}-attempt{attempt}.log")
    assert any("failing once" in m for m in messages[f"trial-a/{TOUCH} attempt 1"])
    assert not any("failing" in m for m in messages[f"trial-a/{TOUCH} attempt 2"])


@pytest.mark.slow
def test_the_flow_run_has_a_results_table_and_a_report_note(ran, prefect_env):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from cruijff.runner import load_experiment

    key = "cruijff-seen-in-prefect"

    async def read(client):
        return await client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key, f"{key}-report"])))

    artifacts = {a.key: a for a in asyncio.run(_read(prefect_env["PREFECT_API_URL"], read))}
    table, note = artifacts[key], artifacts[f"{key}-report"]
    assert table.type == "table" and table.flow_run_id is not None
    assert table.task_run_id is None  # the experiment flow run's own
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [(r["trial"], r["state"]) for r in rows] == [
        ("a", "done"), ("b", f"failed ({TOUCH})")]
    a, b = rows
    metrics = read_record(ran / "trial-a", "eval").metrics
    assert a["metric"] == metrics["headline"]
    assert a["value"] == f"{metrics['headline_value']:.3f}"
    low, high = map(float, re.fullmatch(r"\[(\d\.\d{3}), (\d\.\d{3})\]", a["95% CI"]).groups())
    assert low <= metrics["headline_value"] <= high and low < high  # 2 samples: wide
    assert a["attempts"] == f"{TOUCH} 2, eval 1" and a["error"] == ""
    experiment = load_experiment(ran)
    assert [r["treatment"] for r in rows] == [t.label for t in experiment.trials]
    assert (b["value"], b["95% CI"], b["attempts"]) == ("-", "-", f"{TOUCH} 2")
    assert b["error"] == f"{TOUCH}: {TOUCH}: failing on purpose with exit code 3"
    assert note.type == "markdown" and note.flow_run_id == table.flow_run_id
    assert "1 of 2 trials done" in note.data
    assert f"cruijff analyze {ran}" in note.data and "No report yet" in note.data


def ui_page(url: str, folder: Path, name: str, awaits: str = "") -> str:
    """The Prefect UI page at `url` as a browser shows it: its text once the page has
    fetched and drawn its data (the DOM after a 20 s virtual-time budget, which waits for the
    page's requests), and a screenshot `folder/<name>.png` that must not be blank. A page
    whose text lacks `awaits` is loaded again (three loads at most): on a loaded machine the
    UI's log pane was once still empty when the budget ran out (the API had the lines)."""
    from PIL import Image

    binary = chromium()
    budget = ("--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw")
    for load in range(3):
        dom = run_chromium(binary, folder / f"profile-{name}-{load}", *budget, "--dump-dom",
                           url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        if awaits in dom.stdout:
            break
    shot = folder / f"{name}.png"
    run_chromium(binary, folder / f"profile-{name}-shot", *budget, f"--screenshot={shot}",
                 "--window-size=1400,1000", "--hide-scrollbars", url)
    grey = Image.open(shot).convert("L").histogram()
    assert sum(grey[:235]) / sum(grey) > 0.01, f"{shot} is blank"
    return re.sub(r"<[^>]+>", " ", dom.stdout)


@pytest.mark.slow
def test_the_prefect_ui_shows_an_attempt_its_log_and_the_results(ran, prefect_env, tmp_path):
    """What a Prefect user opens: a failed attempt's task run page (its name, tags and log
    lines) and the experiment's results table artifact."""
    api = prefect_env["PREFECT_API_URL"]
    ui = api.removesuffix("/api")
    tasks, _ = stage_runs(api)
    attempt = tasks[f"trial-b/{TOUCH} attempt 2"]
    page = ui_page(f"{ui}/runs/task-run/{attempt.id}", tmp_path, "task-run",
                   awaits="failing on purpose with exit code 3")
    assert f"trial-b/{TOUCH} attempt 2" in page
    assert "attempt:2" in page and "trial:b" in page
    assert f"{TOUCH}: failing on purpose with exit code 3" in page
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read(client):
        return await client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["cruijff-seen-in-prefect"])))

    artifact = asyncio.run(_read(api, read))[0]
    table = ui_page(f"{ui}/artifacts/artifact/{artifact.id}", tmp_path, "results")
    assert f"failed ({TOUCH})" in table and "95% CI" in table


@pytest.mark.slow
def test_an_artifact_the_server_refuses_never_fails_the_run(ran, prefect_env, monkeypatch):
    """The server answers HTTP 503 to the table: the flow still completes, says why there is
    no table, and the report note is still made."""
    import cruijff.flows.artifacts as artifacts
    import httpx
    from prefect import flow
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cruijff.runner import load_experiment

    def busy(*args, **kwargs):
        request = httpx.Request("POST", "http://prefect/api/artifacts/")
        raise PrefectHTTPStatusError("Service Unavailable", request=request,
                                     response=httpx.Response(503, request=request))

    monkeypatch.setattr(artifacts, "create_table_artifact", busy)

    @flow(name="refused-results")
    def publish_only() -> str:
        from prefect.context import FlowRunContext

        artifacts.publish(load_experiment(ran))
        return str(FlowRunContext.get().flow_run.id)

    with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
        state = publish_only(return_state=True)
        APILogHandler().flush()  # sent now, not at exit to a server the session has stopped
    assert state.is_completed()
    flow_run_id = state.result()

    async def read(client):
        deadline = time.monotonic() + 60
        while True:
            logs = await client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            found = [log.message for log in logs if "artifact" in log.message]
            if found:
                return found
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)

    found = asyncio.run(_read(prefect_env["PREFECT_API_URL"], read))
    assert found == [f"no results artifact for {NAME}: Service Unavailable"]
