"""Scores that are not 0/1 go through analyze with the right statistics, named: a scorer
returning numbers (an error count: lower is better) and one giving C/I/P partial credit,
from a real Inspect eval (the scripted test-double model) through the store to the report."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import yaml

from cruijff.analysis import mean_estimate, paired_bootstrap
from cruijff.state import StageRecord, write_record

TINY = "cruijff/tiny-llama-random"
SCRIPTED = "cruijff-scripted/capitalizer"
WORDS = ["a", "bb", "ccc", "42", "dddd", "ee", "7", "fff"]

GRADED_EVAL = '''
import json

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.scorer import (CORRECT, INCORRECT, PARTIAL, Score, Target, accuracy, mean,
                               scorer, stderr)
from inspect_ai.solver import TaskState, generate, system_message


@scorer(metrics=[mean(), stderr()])
def chars_wrong():
    """How many characters differ from the target: an error, lower is better."""
    async def score(state: TaskState, target: Target) -> Score:
        answer = state.output.completion.strip()
        wrong = (sum(a != b for a, b in zip(answer, target.text))
                 + abs(len(answer) - len(target.text)))
        return Score(value=float(wrong), answer=answer)
    return score


@scorer(metrics=[accuracy(), stderr()])
def graded():
    """C exact, P right but for case, I otherwise."""
    async def score(state: TaskState, target: Target) -> Score:
        answer = state.output.completion.strip()
        value = (CORRECT if answer == target.text else
                 PARTIAL if answer.lower() == target.text.lower() else INCORRECT)
        return Score(value=value, answer=answer)
    return score


@task
def graded_task(data_path, data_ext="json", split="test", system_prompt=""):
    with open(data_path) as fh:
        records = json.load(fh)[split]
    samples = [Sample(input=r["input"], target=r["output"]) for r in records]
    solver = [system_message(system_prompt), generate()] if system_prompt else generate()
    return Task(dataset=MemoryDataset(samples), solver=solver,
                scorer=[chars_wrong(), graded()])
'''

DATA = f'''
import json
import os

WORDS = {WORDS!r}


def build(dataset, data_dir):
    records = [{{"input": f"Capitalize: {{w}}", "output": w.upper()}} for w in WORDS]
    with open(os.path.join(data_dir, dataset), "w") as fh:
        json.dump({{"train": records[:2], "validation": records[:2], "test": records}}, fh)
'''


def evaluate(trial: Path) -> None:
    """Run the built eval stage's own command on the scripted model."""
    config_path = trial / "eval.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["model"], config["model_args"] = f"{SCRIPTED}", {}
    config_path.write_text(yaml.safe_dump(config))
    command = yaml.safe_load((trial / "config.yaml").read_text())["commands"]["eval"]
    proc = subprocess.run(command, cwd=trial, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def record(trial: Path, metric: str) -> dict:
    """Verify the eval with `metric` as eval.metric and record it done; its metrics."""
    from cruijff.registry import STAGES

    config = yaml.safe_load((trial / "eval.yaml").read_text())
    verified = STAGES["eval"].verify(trial, {**config, "metric": metric})
    write_record(trial, StageRecord("eval", "eval-key", "done", outputs=verified.outputs,
                                    metrics=verified.metrics))
    return verified.metrics


def test_error_counts_and_partial_credit_get_bootstrap_statistics(cli, project):
    folder = project.root / "tasks" / "graded"
    folder.mkdir(parents=True)
    (folder / "eval.py").write_text(GRADED_EVAL)
    (folder / "data.py").write_text(DATA)
    built = cli("build", "--config-path", project.config, "--task", "graded", "--model", TINY,
                "--dataset", "g.json", "--name", "exp", "--root", project.experiments,
                "--control", "use_fine_tune=false",
                "--treatment", "eval.system_prompt=Answer in CAPITALS.")
    assert built.code == 0, built.err
    exp = project.experiments / "exp"
    for trial in ("trial-a", "trial-b"):
        evaluate(exp / trial)

    # an error metric: the control gets one wrong per letter, the treatment none
    errors = [float(sum(c.isalpha() for c in w)) for w in WORDS]
    assert record(exp / "trial-a", "chars_wrong/mean")["headline_value"] == sum(errors) / 8
    assert record(exp / "trial-b", "chars_wrong/mean")["headline_value"] == 0.0
    result = cli("analyze", exp, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["metric"] == "mean score"
    assert report["headline"]["text"] == ("metric: chars_wrong/mean (headline; chosen by "
                                          "eval.metric)")
    a, b = report["trials"]
    assert a["scorer"] == "chars_wrong" and a["metric"]["method"] == "bootstrap"
    expected = mean_estimate(errors)  # the same seed (0) as analyze
    assert (a["metric"]["value"], a["metric"]["low"], a["metric"]["high"]) == (
        expected.value, expected.low, expected.high)
    assert a["metric"]["low"] < a["metric"]["value"] < a["metric"]["high"]
    assert b["metric"]["method"] == "bootstrap"  # all 0 errors: still no proportion
    compared = b["vs_control"]
    assert compared["method"] == "paired-bootstrap"
    ids = sorted(f"test-{i}" for i in range(8))
    by_id = {f"test-{i}": e for i, e in enumerate(errors)}
    diff, low, high, p = paired_bootstrap([0.0] * 8, [by_id[i] for i in ids])
    assert (compared["difference"], compared["low"], compared["high"], compared["p"]) == (
        diff, low, high, p)
    assert diff < 0 and high < 0 and compared["losses"] == 6  # lower: fewer errors
    assert b["scorer_metrics"]["graded/accuracy"] == 1.0
    markdown = (exp / "report" / "report.md").read_text()
    assert "Metric: chars_wrong/mean (headline; chosen by eval.metric)." in markdown
    assert "| trial | label | mean score [95% CI] |" in markdown
    assert ("Intervals: percentile bootstrap of the mean score (10,000 resamples, seed 0) "
            "for a, b.") in markdown
    assert ("Tests vs control: paired bootstrap of the mean difference (10,000 resamples, "
            "seed 0) for b.") in markdown
    assert "a negative Δ is the improvement" in markdown
    with (exp / "report" / "results.csv").open() as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    assert rows["a"]["ci_method"] == "bootstrap" and rows["b"]["method"] == "paired-bootstrap"
    assert rows["a"]["headline"] == "chars_wrong/mean"

    # partial credit: P counts 0.5, so the control's scores are not 0/1
    partial = [1.0 if w.isdigit() else 0.5 for w in WORDS]
    record(exp / "trial-a", "graded/accuracy")
    record(exp / "trial-b", "graded/accuracy")
    report = json.loads(cli("analyze", exp, "--json", "--format", "none").out)
    a, b = report["trials"]
    assert report["metric"] == "mean score"
    assert a["scorer"] == "graded" and a["metric"]["method"] == "bootstrap"
    assert a["metric"]["value"] == sum(partial) / 8 == a["scorer_metrics"]["graded/accuracy"]
    # all C, but on a scale with P: the bootstrap, as for the control, not Wilson's 0/1
    assert b["metric"]["method"] == "bootstrap" and b["metric"]["value"] == 1.0
    assert b["vs_control"]["method"] == "paired-bootstrap"  # one side is not 0/1
    assert b["vs_control"]["difference"] == 1.0 - sum(partial) / 8
    assert (b["vs_control"]["wins"], b["vs_control"]["losses"]) == (6, 0)
