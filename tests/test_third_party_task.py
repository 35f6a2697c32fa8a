"""A task written for Inspect alone runs through cruijff unchanged: tests/tasks/organisms has
its own package, two scorers (match, includes), `{input, output}` records without ids, only
`train` and `validation`, and no `system_prompt`/`fewshot`/`data_ext` arguments. Build → run
(prompt optimization with a few-shot treatment) → summary → analyze, with real Inspect evals
of the tiny model under a real Prefect server."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import cruijff

pytestmark = pytest.mark.slow
TINY = "cruijff/tiny-llama-random"
TASK = Path(__file__).parent / "tasks" / "organisms"


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_random_model):
    root = tmp_path_factory.mktemp("organisms")
    shutil.copytree(TASK, root / "tasks" / "organisms",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "models").mkdir()
    (root / "models" / tiny_random_model.name).symlink_to(tiny_random_model)
    (root / "config.yaml").write_text(
        "model_dir: models\ntasks_dir: tasks\ndata_dir: data\nuse_fine_tune: false\n")
    return root


def build_args(site: Path, *extra: str) -> list[object]:
    return ["--config-path", site / "config.yaml", "--root", site, "--name", "organisms",
            "--task", "organisms", "--dataset", "organisms.json", "--model", TINY,
            "--control", "eval.limit=6", "--control", "prompt_opt.max_samples=4",
            "--controls", json.dumps({"prompt_opt.system_prompts": ["", "Shout the word."]}),
            "--treatment", "use_prompt_opt=true",
            "--treatments", json.dumps({"use_prompt_opt": True, "prompt_opt.fewshot.k": 2}),
            *extra]


def test_the_prompt_search_on_the_tasks_own_eval_split_is_refused_first(site, prefect_env):
    """The task evaluates on validation, where the search scores by default: refused, one
    line, nothing written."""
    result = cruijff("build", *build_args(site), env=prefect_env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "validation" in result.stderr and "Traceback" not in result.stderr
    assert not (site / "organisms").exists()


@pytest.fixture(scope="module")
def ran(site, prefect_env):
    result = cruijff("run", *build_args(site, "--control", "prompt_opt.split=train"),
                     env=prefect_env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return site / "organisms", result


def test_it_runs_unchanged_and_summary_says_all_done(ran, prefect_env):
    exp, _ = ran
    assert (TASK / "eval.py").read_text() == (exp.parent / "tasks" / "organisms" /
                                               "eval.py").read_text()
    summary = cruijff("summary", exp, "--json", env=prefect_env)
    assert summary.returncode == 0, summary.stdout + summary.stderr
    stages = {t["id"]: {s: v["state"] for s, v in t["stages"].items()}
              for t in json.loads(summary.stdout)["trials"]}
    assert stages == {"a": {"eval": "done"},
                      "b": {"prompt_opt": "done", "eval": "done"},
                      "c": {"prompt_opt": "done", "eval": "done"}}


def test_the_search_scored_training_records_and_the_eval_validation_ones(ran):
    exp, _ = ran
    for trial, shots in (("b", 0), ("c", 2)):
        rows = list(csv.DictReader((exp / f"trial-{trial}" / "prompt_opt" /
                                    "candidates.csv").open()))
        assert len(rows) == 2 * (1 + (shots > 0))  # two prompts x (zero-shot, one draw)
        seen = {i for r in rows for i in r["validation_sample_ids"].split()}
        assert seen and all(i.startswith("train-") for i in seen), seen
    from inspect_ai.log import list_eval_logs, read_eval_log

    for trial in ("a", "b", "c"):
        [info] = list_eval_logs(str(exp / f"trial-{trial}" / "logs" / "eval"))
        log = read_eval_log(info)
        assert log.status == "success"
        assert [s.id for s in log.samples] == [f"validation-{i}" for i in range(6)]
        assert [s.name for s in log.results.scores] == ["match", "includes"]


def test_the_few_shot_choice_reaches_the_eval_of_the_unchanged_task(ran):
    """Trial c's chosen candidate is applied around the task's own solver in its eval, as in
    its search: the demonstrations are earlier turns of every sample's conversation."""
    import yaml
    from inspect_ai.log import list_eval_logs, read_eval_log

    exp, _ = ran
    chosen = yaml.safe_load((exp / "trial-c" / "prompt_opt" / "chosen.yaml").read_text())
    evaluation = yaml.safe_load((exp / "trial-c" / "eval.yaml").read_text())
    assert evaluation.get("prompt") == chosen.get("prompt")
    assert "system_prompt" not in evaluation["task_args"]
    assert "data_ext" not in evaluation["task_args"]
    [info] = list_eval_logs(str(exp / "trial-c" / "logs" / "eval"))
    sample = read_eval_log(info).samples[0]
    shots = (chosen.get("prompt") or {}).get("fewshot") or []
    users = [m.text for m in sample.messages if m.role == "user"]
    assert users[:-1] == [shot["input"] for shot in shots]
    assert users[-1] == sample.input


def test_analyze_names_the_headline_scorer_and_pairs_on_validation_ids(ran, prefect_env):
    exp, _ = ran
    result = cruijff("analyze", exp, "--json", env=prefect_env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert [t["id"] for t in report["trials"]] == ["a", "b", "c"]
    assert all(t["metric"]["n"] == 6 for t in report["trials"])
    markdown = (exp / "report" / "report.md").read_text()
    assert "match/accuracy" in markdown
