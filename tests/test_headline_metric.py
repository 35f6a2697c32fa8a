"""Several scorers, one headline: `eval.metric` names the scorer/metric (default: the first
scorer's first metric), and every output says which it is; every scorer's metrics stay in
the store and the report; a prompt search whose metric a log lacks fails with one line."""

from __future__ import annotations

import csv
import html
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from cruijff.errors import CruijffError
from cruijff.state import StageRecord, read_record, write_record

TINY = "cruijff/tiny-llama-random"
SCRIPTED = "cruijff-scripted/capitalizer"
DEFAULT = "match/accuracy (headline; default: first scorer's first metric)"
CHOSEN = "includes/accuracy (headline; chosen by eval.metric)"

TWO_SCORERS_EVAL = '''
import json

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.scorer import includes, match
from inspect_ai.solver import generate, system_message


@task
def two(data_path, data_ext="json", split="test", system_prompt=""):
    with open(data_path) as fh:
        records = json.load(fh)[split]
    samples = [Sample(input=r["input"], target=r["output"]) for r in records]
    solver = [system_message(system_prompt), generate()] if system_prompt else generate()
    return Task(dataset=MemoryDataset(samples), solver=solver,
                scorer=[match(location="exact", ignore_case=False), includes()])
'''

DATA = '''
import json
import os


def build(dataset, data_dir):
    records = [{"input": f"Capitalize: {w}", "output": w.upper()}
               for w in ("ab", "cd", "ef", "gh", "ij", "kl")]
    with open(os.path.join(data_dir, dataset), "w") as fh:
        json.dump({"train": records[:2], "validation": records[2:4], "test": records}, fh)
'''


def build(cli, project, *options: str) -> Path:
    folder = project.root / "tasks" / "two"
    if not folder.exists():
        folder.mkdir(parents=True)
        (folder / "eval.py").write_text(TWO_SCORERS_EVAL)
        (folder / "data.py").write_text(DATA)
    result = cli("build", "--config-path", project.config, "--task", "two", "--model", TINY,
                 "--dataset", "t.json", "--name", "exp", "--root", project.experiments,
                 "--control", "use_fine_tune=false", *options)
    assert result.code == 0, result.err
    return project.experiments / "exp"


def run_stage(trial: Path, stage: str) -> subprocess.CompletedProcess:
    """The built stage's own command, on the scripted model."""
    config_path = trial / f"{stage}.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["model"], config["model_args"] = SCRIPTED, {}
    config_path.write_text(yaml.safe_dump(config))
    command = yaml.safe_load((trial / "config.yaml").read_text())["commands"][stage]
    return subprocess.run(command, cwd=trial, capture_output=True, text=True, timeout=600)


def record_done(exp: Path, trial_id: str) -> dict:
    """Verify the eval and record it done with its current key (as a run would)."""
    from cruijff.registry import STAGES
    from cruijff.runner import load_experiment, stage_key

    trial = load_experiment(exp).trial(trial_id)
    config = yaml.safe_load((trial.dir / "eval.yaml").read_text())
    verified = STAGES["eval"].verify(trial.dir, config)
    write_record(trial.dir, StageRecord("eval", stage_key(trial, "eval"), "done",
                                        outputs=verified.outputs, metrics=verified.metrics,
                                        duration_s=1.0))
    return verified.metrics


def test_the_default_headline_is_named_in_every_output(cli, project, monkeypatch, tmp_path):
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing may start
    exp = build(cli, project, "--treatment", "eval.system_prompt=Answer in CAPITALS.")
    for trial in ("a", "b"):
        assert run_stage(exp / f"trial-{trial}", "eval").returncode == 0
    a, b = record_done(exp, "a"), record_done(exp, "b")
    # the scripted model repeats the word unless told CAPITALS: `match` (exact, the first
    # scorer) fails the control, `includes` (case-insensitive) passes it
    assert (a["headline"], a["headline_value"], a["headline_default"]) == (
        "match/accuracy", 0.0, True)
    assert (a["includes/accuracy"], b["headline_value"]) == (1.0, 1.0)

    table = cli("run", exp)
    assert table.code == 0, table.err
    assert "match/accuracy" in table.out and DEFAULT in " ".join(table.out.split())
    ran = json.loads(cli("run", "--json", exp).out)
    assert [t["headline"] for t in ran["trials"]] == [
        {"metric": "match/accuracy", "value": 0.0, "default": True},
        {"metric": "match/accuracy", "value": 1.0, "default": True}]

    summary = cli("summary", exp)
    assert f"metric: {DEFAULT}" in " ".join(summary.out.split())
    summary = json.loads(cli("summary", "--json", exp).out)
    assert summary["headline"] == {"text": f"metric: {DEFAULT}", "metrics": [
        {"metric": "match/accuracy", "default": True}]}

    analyzed = cli("analyze", exp, "--json")
    assert analyzed.code == 0, analyzed.err
    report = json.loads(analyzed.out)
    assert report["headline"]["text"] == f"metric: {DEFAULT}"
    control, treatment = report["trials"]
    assert control["scorer"] == "match" and control["metric"]["value"] == 0.0  # not includes
    assert control["headline"] == {"metric": "match/accuracy", "default": True,
                                   "text": DEFAULT}
    assert control["scorer_metrics"]["includes/accuracy"] == 1.0
    assert set(control["scorer_metrics"]) == {"match/accuracy", "match/stderr",
                                              "includes/accuracy", "includes/stderr"}
    assert treatment["vs_control"]["wins"] == 6
    terminal = cli("analyze", exp, "--format", "none")
    assert f"metric: {DEFAULT}" in " ".join(terminal.out.split())
    markdown = (exp / "report" / "report.md").read_text()
    assert f"Metric: {DEFAULT}." in markdown
    assert "## Every scorer's metrics" in markdown
    assert "| trial | label | match/accuracy | match/stderr | includes/accuracy |" in markdown
    page = (exp / "report" / "report.html").read_text()
    assert html.escape(DEFAULT) in page and 'id="scorer-metrics"' in page
    with (exp / "report" / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["headline"], r["headline_default"]) for r in rows] == [
        ("match/accuracy", "true")] * 2
    assert json.loads(rows[0]["scorer_metrics"])["includes/accuracy"] == 1.0
    with sqlite3.connect(exp / "results.sqlite") as db:
        assert db.execute("select distinct scorer from samples order by scorer").fetchall() \
            == [("includes",), ("match",)]
        assert db.execute("select metric, metric_default from trials").fetchall() == [
            ("match/accuracy", 1)] * 2

    # eval.metric chooses another scorer: analyze reads its samples (an edited eval.yaml,
    # verified again on the same logs)
    for trial in ("a", "b"):
        config = yaml.safe_load((exp / f"trial-{trial}" / "eval.yaml").read_text())
        (exp / f"trial-{trial}" / "eval.yaml").write_text(
            yaml.safe_dump({**config, "metric": "includes/accuracy"}))
        assert record_done(exp, trial)["headline_default"] is False
    report = json.loads(cli("analyze", exp, "--json", "--format", "none").out)
    assert report["headline"]["text"] == f"metric: {CHOSEN}"
    control, treatment = report["trials"]
    assert control["scorer"] == "includes" and control["metric"]["value"] == 1.0
    assert treatment["vs_control"]["difference"] == 0.0
    assert json.loads(cli("run", "--json", exp).out)["trials"][0]["headline"] == {
        "metric": "includes/accuracy", "value": 1.0, "default": False}


def test_eval_metric_is_checked_for_its_form_at_build(cli, project):
    for bad in ("match/", "/accuracy", "a b", ""):
        result = cli("build", "--config-path", project.config, "--task", "toy", "--model",
                     TINY, "--dataset", "d.json", "--name", "bad", "--root",
                     project.experiments, "--control", f"eval.metric={bad}", "--dry-run")
        assert result.code == 2, (bad, result.out)
        assert "eval key 'metric'" in result.err and "'<scorer>/<metric>'" in result.err
        assert len(result.err.strip().splitlines()) == 1
    exp = build(cli, project, "--control", "eval.metric=accuracy")
    assert yaml.safe_load((exp / "trial-a" / "eval.yaml").read_text())["metric"] == "accuracy"


def test_a_metric_the_log_lacks_fails_the_eval_naming_those_it_has(tmp_path):
    from results_support import write_eval_log_file

    from cruijff.registry import STAGES
    from cruijff.stages import StageFailed
    from cruijff.stages.eval import headline_metric, parse_metric

    logs = tmp_path / "logs" / "eval"
    write_eval_log_file(logs / "x.eval", [1, 0, 1])
    config = {"log_dir": str(logs), "metric": "match/accuracy"}
    with pytest.raises(StageFailed, match=r"eval.metric 'match/accuracy': the eval log has "
                       r"no metric 'match/accuracy'; it has exact_match/accuracy$"):
        STAGES["eval"].verify(tmp_path, config)
    verified = STAGES["eval"].verify(tmp_path, {**config, "metric": "accuracy"})
    assert verified.metrics["headline"] == "exact_match/accuracy"  # the first scorer's
    assert verified.metrics["headline_default"] is False
    assert parse_metric("pkg/scorer/mean", "design") == "pkg/scorer/mean"
    with pytest.raises(CruijffError):
        parse_metric(3, "design")
    assert headline_metric(type("Log", (), {"results": None})(), None) is None


def test_a_prompt_search_whose_metric_is_missing_fails_with_one_line(cli, project):
    exp = build(cli, project, "--treatment", "use_prompt_opt=true", "--controls", json.dumps(
        {"prompt_opt.system_prompts": ["Repeat.", "Answer in CAPITALS."],
         "eval.metric": "exact/accuracy"}))
    trial = exp / "trial-b"
    failed = run_stage(trial, "prompt_opt")
    assert failed.returncode == 2, failed.stdout + failed.stderr
    [line] = failed.stderr.strip().splitlines()
    assert line == ("error: prompt_opt candidate 1: eval.metric 'exact/accuracy': the eval "
                    "log has no metric 'exact/accuracy'; it has match/accuracy, match/stderr, "
                    "includes/accuracy, includes/stderr")
    assert not (trial / "prompt_opt" / "chosen.yaml").exists()  # nothing chosen

    config = yaml.safe_load((trial / "eval.yaml").read_text())
    (trial / "eval.yaml").write_text(yaml.safe_dump({**config, "metric": "includes/accuracy"}))
    done = run_stage(trial, "prompt_opt")
    assert done.returncode == 0, done.stdout + done.stderr
    with (trial / "prompt_opt" / "candidates.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    # includes passes both prompts (case-insensitive): a tie, the first is kept
    assert [(r["score"], r["metric"], r["metric_default"], r["chosen"]) for r in rows] == [
        ("1.000000", "includes/accuracy", "false", "yes"),
        ("1.000000", "includes/accuracy", "false", "")]
    assert read_record(trial, "prompt_opt") is None  # run_stage runs, it does not record
