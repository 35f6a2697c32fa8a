"""`inspect view` over an experiment reads as the experiment: every Inspect log a stage writes
(the eval's, each prompt candidate's) names the model by its id, not a checkpoint path, and
carries the experiment, trial, treatment and stage run in its tags and metadata; a failed eval
keeps its log (status error) beside the retry's, while verify and analyze read only the one
that succeeded. Real runs of the tiny model under a real Prefect server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import EXAMPLE, cruijff, says_no_gpu

from cruijff.stages.eval import STAGE_RUN_ENVIRONMENT, inspect_names
from cruijff.state import read_record

pytestmark = pytest.mark.slow
TINY = "cruijff/tiny-llama-random"
FAST = ["--control", "torchtune.epochs=1", "--control", "torchtune.max_steps_per_epoch=2",
        "--control", "torchtune.lr_scheduler.num_warmup_steps=0", "--control", "eval.limit=2"]
FLAKY_SCORE = '''        answer = state.output.completion.strip()
        failed_once = Path.cwd() / ".flaky-failed-once"  # the trial's folder: per trial
        if not failed_once.exists():
            failed_once.touch()
            raise RuntimeError("flaky scorer: fails its first attempt")
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_random_model):
    """The example's task, and `flaky`: the same task whose scorer fails its first attempt
    in each trial (and succeeds when cruijff retries it)."""
    root = tmp_path_factory.mktemp("inspect-logs")
    tasks = root / "tasks"
    shutil.copytree(EXAMPLE / "tasks", tasks, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tasks / "capitalization", tasks / "flaky")
    source = (tasks / "flaky" / "eval.py").read_text()
    assert "        answer = state.output.completion.strip()\n" in source
    source = source.replace("        answer = state.output.completion.strip()\n", FLAKY_SCORE)
    (tasks / "flaky" / "eval.py").write_text(source.replace("def capitalization(",
                                                             "def flaky("))
    (root / "models").mkdir()
    (root / "models" / tiny_random_model.name).symlink_to(tiny_random_model)
    (root / "config.yaml").write_text("model_dir: models\ntasks_dir: tasks\ndata_dir: data\n")
    return root


@pytest.fixture(scope="module")
def tagged(site, prefect_env):
    """a: fine-tunes (control); b: the base model; c: a's fine-tune on a device that does
    not exist (fails, retried once); d: prompt optimization of the base model."""
    result = cruijff("run", "--config-path", site / "config.yaml", "--root", site,
                     "--name", "tagged", "--task", "capitalization",
                     "--dataset", "words_5L_80_1000.json", "--model", TINY, *FAST,
                     "--treatment", "use_fine_tune=false",
                     "--treatment", "eval.model_args.device=cuda:7",
                     "--treatments", json.dumps({"use_fine_tune": False, "use_prompt_opt": True,
                                                 "prompt_opt.max_candidates": 1,
                                                 "prompt_opt.max_samples": 2}),
                     env=prefect_env, timeout=900)
    assert result.returncode == 1, result.stdout + result.stderr  # c fails
    return site / "tagged"


def logs_in(folder: Path) -> list:
    from inspect_ai.log import list_eval_logs, read_eval_log

    return sorted((read_eval_log(info, header_only=True)
                   for info in list_eval_logs(str(folder), recursive=False)),
                  key=lambda log: log.eval.created)


def test_the_eval_log_names_the_model_by_its_id_and_tags_the_trial(tagged):
    for trial, model, label in (("a", f"hf/{TINY}+a", "control"),
                                ("b", f"hf/{TINY}", "use_fine_tune=False")):
        record = read_record(tagged / f"trial-{trial}", "eval")
        assert record.status == "done", record.error
        [log] = logs_in(tagged / f"trial-{trial}" / "logs" / "eval")
        assert log.status == "success" and log.eval.model == model
        assert set(log.eval.tags) == {"cruijff", "exp:tagged", f"trial:{trial}",
                                      f"treatment:{label}", "stage:eval", "attempt:1"}
        meta = log.eval.metadata
        assert (meta["experiment"], meta["trial"], meta["label"], meta["stage"]) == \
            ("tagged", trial, label, "eval")
        assert meta["treatment"] == ({} if trial == "a" else {"use_fine_tune": False})
        assert (meta["stage_key"], meta["attempt"], meta["run_id"]) == \
            (record.key, 1, record.run_id)
        assert meta["base_model"] == TINY


def test_the_weights_come_from_the_trials_model(tagged):
    """Named by its id, the model is still loaded from the checkpoint (or the base model's
    folder): `model_path` in the log's model args."""
    [fine_tuned] = logs_in(tagged / "trial-a" / "logs" / "eval")
    assert fine_tuned.eval.model_args["model_path"] == \
        str(tagged / "trial-a" / "checkpoints" / "final")
    [base] = logs_in(tagged / "trial-b" / "logs" / "eval")
    assert Path(base.eval.model_args["model_path"]).name == "cruijff__tiny-llama-random"


def test_each_prompt_candidates_log_is_tagged_too(tagged):
    record = read_record(tagged / "trial-d", "prompt_opt")
    assert record.status == "done", record.error
    [log] = logs_in(tagged / "trial-d" / "logs" / "prompt_opt" / "c1")
    assert log.status == "success" and log.eval.model == f"hf/{TINY}"
    assert {"exp:tagged", "trial:d", "stage:prompt_opt", "candidate:1"} <= set(log.eval.tags)
    meta = log.eval.metadata
    assert (meta["trial"], meta["stage"], meta["candidate"], meta["stage_key"]) == \
        ("d", "prompt_opt", 1, record.key)
    [evaluated] = logs_in(tagged / "trial-d" / "logs" / "eval")
    assert evaluated.eval.metadata["stage"] == "eval" and "trial:d" in evaluated.eval.tags


def test_an_eval_that_fails_before_inspect_runs_it_keeps_an_error_log(tagged):
    """c's model cannot load (so Inspect itself writes no log): each of its two attempts
    leaves a log of status error, named and tagged as a successful one, with the error."""
    record = read_record(tagged / "trial-c", "eval")
    assert record.status == "failed" and record.attempts == 2
    logs = logs_in(tagged / "trial-c" / "logs" / "eval")
    assert [log.status for log in logs] == ["error", "error"]
    assert [log.eval.metadata["attempt"] for log in logs] == [1, 2]
    for log in logs:
        assert log.eval.model == f"hf/{TINY}+c" and "trial:c" in log.eval.tags
        assert says_no_gpu(log.error.message) and log.eval.task == "capitalization"


def test_a_retried_eval_keeps_the_failed_attempts_log_and_reads_the_successful_one(
        site, prefect_env):
    flaky = cruijff("run", "--config-path", site / "config.yaml", "--root", site,
                    "--name", "flaky", "--task", "flaky", "--dataset", "words_5L_80_1000.json",
                    "--model", TINY, "--control", "use_fine_tune=false",
                    "--control", "eval.limit=2", "--treatment", "eval.limit=3",
                    env=prefect_env, timeout=900)
    assert flaky.returncode == 0, flaky.stdout + flaky.stderr
    exp = site / "flaky"
    for trial, samples in (("a", 2), ("b", 3)):
        record = read_record(exp / f"trial-{trial}", "eval")
        assert record.status == "done" and record.attempts == 2
        logs = logs_in(exp / f"trial-{trial}" / "logs" / "eval")
        assert [log.status for log in logs] == ["error", "success"]
        assert "flaky scorer" in logs[0].error.message
        assert [log.eval.metadata["attempt"] for log in logs] == [1, 2]
        assert Path(logs[1].location).name == Path(record.outputs[0]).name
        assert record.metrics["samples"] == samples
    analyzed = cruijff("analyze", exp, "--json", env=prefect_env)
    assert analyzed.returncode == 0, analyzed.stdout + analyzed.stderr
    report = json.loads(analyzed.stdout)
    assert "flaky scorer" not in analyzed.stdout
    counts = {row["id"]: row["metric"]["n"] for row in report["trials"]}
    assert counts == {"a": 2, "b": 3}


def test_a_stage_run_by_hand_is_named_by_what_its_trial_says(tagged, monkeypatch):
    """Without `cruijff run` (no stage key in the environment) the log still names the
    trial; a config outside any trial keeps its model as written."""
    for variable in STAGE_RUN_ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    trial = tagged / "trial-a"
    config = {"model": f"hf/{trial / 'checkpoints' / 'epoch_0'}"}
    names = inspect_names(config, trial, "eval")
    assert names.model == f"hf/{TINY}+a/epoch_0"
    assert names.metadata["trial"] == "a" and "stage_key" not in names.metadata
    alone = inspect_names({"model": "hf//somewhere/model"}, tagged.parent, "eval")
    assert alone.model == "hf//somewhere/model" and alone.tags == ["cruijff", "stage:eval"]
