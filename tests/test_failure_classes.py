"""Failures that would repeat are not retried: `cruijff exec` reports a deterministic error
(the task cannot import, bad task arguments, a missing split or file), the runner records the
class, and the retry loop (the same loop under Prefect) stops there; a kill, an
OUT_OF_MEMORY or anything unknown is transient and retried as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cruijff import sacct
from cruijff.attempts import failure_class
from cruijff.errors import CruijffError
from cruijff.pipeline import RunPlan, Sharing, run_in_process, run_trial, run_with_retries
from cruijff.runner import (
    FAILURE_REPORT,
    execute_stage,
    failure_path,
    load_experiment,
    stage_key,
)
from cruijff.state import SlurmAccounting, StageRecord, _validated, read_record, write_record

TOUCH = "testing_touch"
TINY = "cruijff/tiny-llama-random"


class DatasetGenerationError(Exception):
    """Named as Hugging Face datasets names its own (cruijff does not import datasets)."""


class OutOfMemoryError(RuntimeError):
    """Named as torch.cuda's."""


def wrapped(outer: Exception, inner: Exception) -> Exception:
    """`outer` raised `from None` while handling `inner`, as task_factory wraps a task's error."""
    try:
        try:
            raise inner
        except Exception:
            raise outer from None
    except Exception as exc:
        return exc


class Failed(Exception):
    deterministic = True  # a StageFailed (or any error) that says so


@pytest.mark.parametrize(("error", "kind"), [
    (CruijffError("task 'x': importing eval.py failed: ModuleNotFoundError: sklearn"),
     "deterministic"),
    (ModuleNotFoundError("No module named 'sklearn'"), "deterministic"),
    (TypeError("minimal() missing 1 required positional argument: 'one_extra_arg'"),
     "deterministic"),
    (FileNotFoundError(2, "No such file or directory", "/data/d.json"), "deterministic"),
    (DatasetGenerationError("An error occurred while generating the dataset"),
     "deterministic"),
    (ValueError('Unknown split "test". Should be one of [\'train\', \'validation\'].'),
     "deterministic"),
    (Failed("the eval config names no log"), "deterministic"),
    (wrapped(CruijffError("task 'x': f() failed: KeyError: 'test'"), KeyError("test")),
     "deterministic"),
    (wrapped(CruijffError("task 'x': f() failed: ConnectionError: reset"),
             ConnectionError("reset")), "transient"),
    (OutOfMemoryError("CUDA out of memory"), "transient"),
    (TimeoutError("timed out"), "transient"),
    (MemoryError(), "transient"),
    (RuntimeError("something else"), "transient"),
    (ValueError("a value"), "transient"),
    (KeyError("id"), "transient"),
])
def test_errors_are_classed_by_whether_a_retry_would_repeat_them(error, kind):
    assert failure_class(error)[0] == kind


def test_the_reason_is_one_line():
    assert failure_class(CruijffError("task 'x': broken\nsecond line")) == (
        "deterministic", "task 'x': broken")
    assert failure_class(TypeError("bad\nmore")) == ("deterministic", "TypeError: bad")


def test_cruijff_exec_reports_a_deterministic_error_where_the_runner_reads_it(tmp_path):
    report = tmp_path / "failure.json"
    env = dict(os.environ, **{FAILURE_REPORT: str(report)})
    proc = subprocess.run([sys.executable, "-m", "cruijff", "exec", TOUCH,
                           str(tmp_path / "absent.yaml")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr
    written = json.loads(report.read_text())
    assert written["class"] == "deterministic" and "absent.yaml" in written["reason"]
    env.pop(FAILURE_REPORT)
    report.unlink()
    subprocess.run([sys.executable, "-m", "cruijff", "exec", TOUCH,
                    str(tmp_path / "absent.yaml")], env=env, capture_output=True, timeout=120)
    assert not report.exists()  # no channel asked for: nothing written


@pytest.fixture
def make(doubles):
    def build(treatments: list[dict], retries: int = 2) -> Path:
        return doubles([TOUCH], treatments, "exp", f"orchestration: {{retries: {retries}}}\n")

    return build


def deterministic_touch(trial_dir: Path) -> None:
    """Edit the trial's testing_touch config so that its stage raises a TypeError (a path
    that is a number), as a task function given a bad argument would."""
    path = trial_dir / f"{TOUCH}.yaml"
    config = yaml.safe_load(path.read_text())
    config["wait_for"] = 5
    path.write_text(yaml.safe_dump(config))


def test_a_deterministic_failure_is_run_once_and_recorded_so(make):
    exp = make([{f"{TOUCH}.index": 1}], retries=2)
    trial = load_experiment(exp).trial("a")
    deterministic_touch(trial.dir)
    calls, lines = [], []

    def submit(trial, stage, key, attempt, grown=None):
        calls.append(attempt)
        return execute_stage(trial, stage, key).is_done

    done = run_with_retries(trial, TOUCH, stage_key(trial, TOUCH), submit, retries=2,
                            say=lines.append)
    assert not done and calls == [1]
    record = read_record(trial.dir, TOUCH)
    assert (record.status, record.attempts, record.failure) == ("failed", 1, "deterministic")
    # Python's own words, which differ by version: 3.11 "expected str, bytes or os.PathLike
    # object, not int", 3.12 "argument should be a str or an os.PathLike object ..."
    assert record.failure_reason.startswith("TypeError: ")
    assert "os.PathLike" in record.failure_reason and "int" in record.failure_reason
    assert record.error.splitlines()[0] == \
        f"not retried: {record.failure_reason} (deterministic)"
    assert "exit code 1" in record.error  # the stage's own exit and log tail stay
    assert lines == [f"trial a {TOUCH}: not retried: {record.failure_reason} (deterministic)"]


def test_a_transient_failure_is_still_retried_and_says_why(make, tmp_path):
    exp = make([{f"{TOUCH}.exit_code": 4}], retries=1)
    assert run_in_process(RunPlan.make(exp, workers=1)) == {"a": {TOUCH: "failed"}}
    record = read_record(exp / "trial-a", TOUCH)
    assert (record.attempts, record.failure, record.failure_reason) == (2, "transient", None)
    assert record.history[0]["failure"] == "transient"
    assert not record.error.startswith("not retried")


def test_a_killed_attempt_is_transient_whatever_it_reported(make):
    """A stale (or half-true) report does not outweigh a kill by a signal."""
    from cruijff.runner import _failure_class

    exp = make([{f"{TOUCH}.index": 1}])
    trial_dir = exp / "trial-a"
    failure_path(trial_dir, TOUCH).parent.mkdir(exist_ok=True)
    failure_path(trial_dir, TOUCH).write_text(json.dumps(
        {"class": "deterministic", "reason": "x"}))
    assert _failure_class(trial_dir, TOUCH, -9) == ("transient", "killed by SIGKILL")
    assert _failure_class(trial_dir, TOUCH, 1) == ("deterministic", "x")
    failure_path(trial_dir, TOUCH).write_text("{not json")
    assert _failure_class(trial_dir, TOUCH, 1) == ("transient", None)


def test_slurm_ending_an_attempt_makes_it_transient_with_sacct_stubbed(make, monkeypatch):
    """An attempt Slurm ended for memory is retried even if its stage reported an error."""
    exp = make([{f"{TOUCH}.index": 1}], retries=1)
    experiment = load_experiment(exp)
    trial = experiment.trial("a")

    def stub_sacct(job_id, step_id, step_name, *, requested, wait_s, poll_s=1.0):
        return SlurmAccounting(job_id=job_id, step_id="3", step_name=step_name,
                               state="OUT_OF_MEMORY", source="sacct")

    monkeypatch.setattr(sacct, "step_accounting", stub_sacct)
    calls = []

    def submit(trial, stage, key, attempt, grown=None):
        calls.append(attempt)
        write_record(trial.dir, StageRecord(
            stage, key, "failed", attempts=attempt, where="slurm:77",
            slurm=SlurmAccounting(job_id="77", step_name="s"), failure="deterministic",
            failure_reason="MemoryError wrapped", error="not retried: x (deterministic)\nboom"))
        return False

    outcome = run_trial(experiment, trial, [TOUCH], submit,
                        sharing=Sharing([(trial, [TOUCH])]), retries=1)
    assert outcome == {TOUCH: "failed"} and calls == [1, 2]
    record = read_record(trial.dir, TOUCH)
    assert (record.failure, record.outcome) == ("transient", "OUT_OF_MEMORY")
    assert record.error.startswith("OUT_OF_MEMORY") and "not retried" not in record.error


def test_records_from_before_failure_classes_still_load():
    old = {"stage": "eval", "key": "k", "status": "failed", "error": "exit code 1"}
    record, problem = _validated(old)
    assert problem is None and record.failure is None and not record.deterministic


def test_prefect_stage_tasks_do_not_retry_on_their_own():
    """The flows run cruijff's own retry loop (run_trial -> run_with_retries); a Prefect
    task retry would run a deterministic failure again behind its back."""
    from cruijff.flows import experiment

    assert experiment.run_stage.retries == 0
    assert experiment.trial_flow.retries in (0, None)
    assert experiment.run_trial is run_trial


def run_once(cli, project, name: str, eval_py: str, helper: str | None = None):
    """Build a one-trial eval-only experiment of task `name` (two retries allowed), run it in
    process, expect its eval to fail after one attempt, deterministic; its record."""
    folder = project.root / "tasks" / name
    folder.mkdir(parents=True)
    (folder / "eval.py").write_text(eval_py)
    if helper is not None:
        (folder / "helper.py").write_text(helper)
    (folder / "data.py").write_text(
        "import json, os\n\n\ndef build(dataset, data_dir):\n"
        "    with open(os.path.join(data_dir, dataset), 'w') as fh:\n"
        "        json.dump({'train': [], 'test': []}, fh)\n")
    project.config.write_text(project.config.read_text() + "orchestration: {retries: 2}\n")
    result = cli("build", "--config-path", project.config, "--task", name, "--model", TINY,
                 "--dataset", f"{name}.json", "--name", "exp", "--root", project.experiments,
                 "--control", "use_fine_tune=false")
    assert result.code == 0, result.err
    exp = project.experiments / "exp"
    assert run_in_process(RunPlan.make(exp, workers=1)) == {"a": {"eval": "failed"}}
    record = read_record(exp / "trial-a", "eval")
    assert (record.attempts, record.failure) == (1, "deterministic")
    return record, exp


def test_an_eval_whose_task_cannot_import_fails_once_and_summary_says_why(cli, project):
    """A real eval stage: eval.py's sibling module raises ModuleNotFoundError at import,
    which build cannot see (the import is dynamic). Two retries allowed, one attempt run."""
    record, exp = run_once(cli, project, "late", eval_py=(
        "import helper\nfrom inspect_ai import Task, task\n\n\n"
        "@task\ndef late(data_path, data_ext='json'):\n    return Task(dataset=[])\n"),
        helper="import importlib\nimportlib.import_module('cruijff_absent_' + 'scorer_lib')\n")
    assert "ModuleNotFoundError" in record.failure_reason
    assert "cruijff_absent_scorer_lib" in record.failure_reason
    summary = json.loads(cli("summary", "--json", exp).out)
    error = summary["trials"][0]["stages"]["eval"]["error"]
    assert error.startswith("not retried: ") and error.splitlines()[0].endswith(
        "(deterministic)")


def test_a_scorer_whose_import_fails_inside_inspect_is_not_retried(cli, project):
    """The import fails only when Inspect calls the scorer (the eval log has status error,
    eval_set returns unsuccessful): the eval stage names the module and is run once."""
    record, _ = run_once(cli, project, "lazy", eval_py=(
        "from inspect_ai import Task, task\nfrom inspect_ai.dataset import Sample\n"
        "from inspect_ai.scorer import Score, accuracy, scorer\n"
        "from inspect_ai.solver import generate\n\n\n"
        "@scorer(metrics=[accuracy()])\ndef lazy_scorer():\n"
        "    async def score(state, target):\n"
        "        import importlib\n"
        "        importlib.import_module('cruijff_absent_' + 'metric_lib')\n"
        "        return Score(value=1)\n    return score\n\n\n"
        "@task\ndef lazy(data_path):\n"
        "    return Task(dataset=[Sample(input='a', target='A')], solver=generate(),\n"
        "                scorer=lazy_scorer())\n"))
    assert "cruijff_absent_metric_lib" in record.failure_reason
