"""Prompt optimization as a stage: candidates scored on the validation split with the task's
own @task, the best written into the eval config, the test split never seen by the search."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
import yaml
from conftest import cruijff, make_site

from cruijff.state import read_record

TINY = "cruijff/tiny-llama-random"
PROMPTS = '["Repeat the word.", "Answer in CAPITALS."]'


def build(cli, site, name: str, *extra: str):
    result = cli("build", "--config-path", site / "config.yaml", "--root", site, "--name", name,
                 "--task", "capitalization", "--dataset", "words_5L_80_1000.json",
                 "--model", TINY, *extra, cwd=site)
    assert result.code == 0, result.err
    return site / name


def test_the_search_picks_the_instruction_that_works_with_the_scripted_test_double(
        cli, tmp_path, tiny_random_model):
    """cruijff-scripted/capitalizer (a test double) capitalizes only when told CAPITALS."""
    site = make_site(tmp_path, tiny_random_model)
    exp = build(cli, site, "po", "--control", "use_fine_tune=false",
                "--control", "use_prompt_opt=true",
                "--controls", json.dumps({"prompt_opt.system_prompts": json.loads(PROMPTS),
                                          "prompt_opt.fewshot.k": 2,
                                          "prompt_opt.max_samples": 10}))
    trial = exp / "trial-a"
    config_path = trial / "prompt_opt.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["model"] = "cruijff-scripted/capitalizer"  # the test double instead of the tiny model
    config["model_args"] = {}
    config_path.write_text(yaml.safe_dump(config))
    command = yaml.safe_load((trial / "config.yaml").read_text())["commands"]["prompt_opt"]
    proc = subprocess.run(command, cwd=trial, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    rows = list(csv.DictReader((trial / "prompt_opt" / "candidates.csv").open()))
    assert len(rows) == 4  # 2 instructions x (zero-shot, one 2-shot draw)
    chosen = yaml.safe_load((trial / "prompt_opt" / "chosen.yaml").read_text())
    assert chosen["task_args"]["system_prompt"] == "Answer in CAPITALS."
    assert chosen["score"] == 1.0
    scores = {r["label"]: float(r["score"]) for r in rows}
    assert all(v == 0.0 for k, v in scores.items() if "Repeat" in k)
    evaluation = yaml.safe_load((trial / "eval.yaml").read_text())
    assert evaluation["task_args"]["system_prompt"] == "Answer in CAPITALS."
    assert evaluation["task_args"].get("split", "test") == "test"

    data = json.loads((site / "data" / "words_5L_80_1000.json").read_text())
    ids = {split: {r["id"] for r in records} for split, records in data.items()}
    seen = {i for r in rows for i in r["validation_sample_ids"].split()}
    assert seen and seen <= ids["validation"] and not seen & ids["test"]
    demos = {i for r in rows if "shots" in r["label"]
             for i in r["label"].split("shots ")[1].split(",")}
    assert demos and demos <= ids["train"]

    from cruijff.registry import STAGES

    verified = STAGES["prompt_opt"].verify(trial, yaml.safe_load(config_path.read_text()))
    assert verified.metrics == {"best_score": 1.0, "candidates": 4, "chosen": 3}


def test_a_task_without_prompt_arguments_is_optimized_but_needs_a_validation_split(
        cli, project):
    """Any task can be optimized (tests/test_prompt_opt_any_task.py); the toy data has no
    validation split to score candidates on, so the build says so."""
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--control", "use_prompt_opt=true",
                 cwd=project.experiments)
    assert result.code == 2
    assert "has no split 'validation' (it has 'train', 'test')" in result.err


@pytest.mark.slow
def test_fine_tune_times_prompt_opt_end_to_end_and_forcing_prompt_opt(
        tmp_path, tiny_random_model, prefect_env):
    site = make_site(tmp_path, tiny_random_model)
    args = ["--config-path", site / "config.yaml", "--root", site, "--name", "grid",
            "--task", "capitalization", "--dataset", "words_5L_80_1000.json", "--model", TINY,
            "--control", "torchtune.epochs=1", "--control", "torchtune.max_steps_per_epoch=3",
            "--control", "eval.limit=3", "--control", "prompt_opt.max_samples=3",
            "--controls", json.dumps({"prompt_opt.system_prompts": ["", "Answer in capitals."]}),
            "--treatments", '{"use_fine_tune": [true, false], "use_prompt_opt": [true, false]}']
    result = cruijff("run", *args, env=prefect_env)
    assert result.returncode == 0, result.stdout + result.stderr
    exp = site / "grid"
    trials = {t["id"]: t for t in yaml.safe_load((exp / "config.yaml").read_text())["trials"]}
    assert len(trials) == 4
    optimized = [i for i, t in trials.items() if t["use_prompt_opt"]]
    assert len(optimized) == 2
    for trial_id in optimized:
        trial = exp / f"trial-{trial_id}"
        chosen = yaml.safe_load((trial / "prompt_opt" / "chosen.yaml").read_text())
        evaluation = yaml.safe_load((trial / "eval.yaml").read_text())
        assert evaluation["task_args"]["system_prompt"] == chosen["task_args"]["system_prompt"]
        assert read_record(trial, "eval").status == "done"

    target = optimized[0]
    evals_before = sorted(exp.glob("trial-*/logs/eval-attempt*.log"))
    forced = cruijff("run", "--stage", "prompt_opt", "--trials", target, "--force", exp,
                     env=prefect_env)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert sorted(exp.glob("trial-*/logs/eval-attempt*.log")) == evals_before
    status = json.loads(cruijff("summary", "--json", exp, env=prefect_env).stdout)
    stale = next(t for t in status["trials"] if t["id"] == target)["stages"]["eval"]
    assert stale["state"] == "outdated"  # it evaluated the previous prompt_opt run's choice
    assert status["complete"] is False
    again = cruijff("run", exp, env=prefect_env)
    assert again.returncode == 0, again.stdout + again.stderr
    new_evals = set(exp.glob("trial-*/logs/eval-attempt*.log")) - set(evals_before)
    assert {p.parent.parent.name for p in new_evals} == {f"trial-{target}"}
