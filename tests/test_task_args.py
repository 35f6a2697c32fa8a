"""A task gets only the arguments it takes: data_path and data_ext where it has them, the rest
from eval.yaml, the experiment's eval_config or the design; a required argument nobody gives
is refused at build, naming it and where to set it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from cruijff.tasks import load_task

TINY = "cruijff/tiny-llama-random"

MINIMAL_EVAL = '''
import json

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.scorer import match
from inspect_ai.solver import generate


@task
def minimal(data_path, one_extra_arg, *, split="test"):
    """The spec's contract taken literally, without data_ext: one_extra_arg is required."""
    with open(data_path) as fh:
        records = json.load(fh)[split][:one_extra_arg]
    return Task(dataset=MemoryDataset([Sample(input=r["input"], target=r["output"])
                                       for r in records]),
                solver=generate(), scorer=match())
'''

OWN_DATA_EVAL = '''
from inspect_ai import Task, task


@task
def own_data(split="test", system_prompt="", fewshot=None):
    """Reads its own data: takes neither data_path nor data_ext."""
    raise NotImplementedError
'''

DATA = '''
import json
import os


def build(dataset, data_dir):
    records = [{"input": f"Capitalize: {w}", "output": w.upper()} for w in ("ab", "cd", "ef")]
    with open(os.path.join(data_dir, dataset), "w") as fh:
        json.dump({"train": records, "validation": records, "test": records}, fh)
'''


def write_task(root: Path, name: str, eval_py: str, eval_yaml: str | None = None) -> Path:
    folder = root / "tasks" / name
    folder.mkdir(parents=True)
    (folder / "eval.py").write_text(eval_py)
    (folder / "data.py").write_text(DATA)
    if eval_yaml is not None:
        (folder / "eval.yaml").write_text(eval_yaml)
    return folder


def build(cli, project, task: str, *extra: str, name: str = "exp"):
    return cli("build", "--config-path", project.config, "--task", task, "--model", TINY,
               "--dataset", "m.json", "--name", name, "--root", project.experiments,
               "--control", "use_fine_tune=false", *extra)


def stage_config(project, stage: str, trial: str = "a", name: str = "exp") -> dict:
    return yaml.safe_load(
        (project.experiments / name / f"trial-{trial}" / f"{stage}.yaml").read_text())


def test_the_task_module_knows_its_required_arguments(project):
    write_task(project.root, "minimal", MINIMAL_EVAL)
    task = load_task(project.root / "tasks", "minimal")
    assert task.required == ["data_path", "one_extra_arg"]
    assert not task.has_parameter("data_ext")


def test_a_task_without_data_ext_gets_only_its_arguments_and_evaluates(cli, project):
    """A real eval on the tiny model: the task is called with exactly what it takes."""
    write_task(project.root, "minimal", MINIMAL_EVAL, "one_extra_arg: 2\n")
    result = build(cli, project, "minimal")
    assert result.code == 0, result.err
    trial = project.experiments / "exp" / "trial-a"
    config = stage_config(project, "eval")
    assert "data_ext" not in config["task_args"]
    assert config["task_args"]["one_extra_arg"] == 2
    assert config["data_path"] == config["task_args"]["data_path"]
    command = yaml.safe_load((trial / "config.yaml").read_text())["commands"]["eval"]
    proc = subprocess.run(command, cwd=trial, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from inspect_ai.log import list_eval_logs, read_eval_log

    [info] = list_eval_logs(str(trial / "logs" / "eval"))
    log = read_eval_log(info)
    assert log.status == "success"
    assert [s.id for s in log.samples] == ["test-0", "test-1"]  # one_extra_arg arrived


def test_a_required_argument_nobody_gives_is_a_build_error_naming_it(cli, project):
    write_task(project.root, "minimal", MINIMAL_EVAL)
    result = build(cli, project, "minimal")
    assert result.code == 2
    [line] = result.err.strip().splitlines()
    assert "@task minimal() requires 'one_extra_arg'" in line
    assert str(project.root / "tasks" / "minimal" / "eval.yaml") in line
    assert "eval_config" in line and "eval.one_extra_arg" in line
    assert not any(project.experiments.iterdir())


def test_the_design_or_the_eval_config_may_give_a_required_argument(cli, project):
    write_task(project.root, "minimal", MINIMAL_EVAL)
    for name, key, value in (("short", "eval.one_extra_arg", 1),
                             ("long", "eval.task_args.one_extra_arg", 3)):
        result = build(cli, project, "minimal", "--control", f"{key}={value}", name=name)
        assert result.code == 0, result.err
        assert stage_config(project, "eval", "a", name)["task_args"]["one_extra_arg"] == value

    (project.root / "overrides.yaml").write_text("task_args: {one_extra_arg: 2}\n")
    project.config.write_text(project.config.read_text() + "eval_config: overrides.yaml\n")
    result = build(cli, project, "minimal", name="configured")
    assert result.code == 0, result.err
    assert stage_config(project, "eval", "a", "configured")["task_args"]["one_extra_arg"] == 2


def test_a_wrongly_typed_argument_is_still_refused(cli, project):
    write_task(project.root, "minimal", MINIMAL_EVAL, "one_extra_arg: 2\n")
    result = build(cli, project, "minimal", "--control", "eval.one_extra_arg=many")
    assert result.code == 2
    assert "one_extra_arg" in result.err and "expects an integer" in result.err


def test_a_task_that_reads_its_own_data_builds_and_prompt_opt_keeps_the_data_file(
        cli, project):
    """Neither data argument goes to the task; prompt_opt still draws demonstrations from
    the trial's data file, and a config built before `data_path` was its own key reads."""
    write_task(project.root, "own", OWN_DATA_EVAL)
    result = build(cli, project, "own", "--treatment", "use_prompt_opt=true")
    assert result.code == 0, result.err
    data = str(project.root / "data" / "m.json")
    for stage, trial in (("eval", "a"), ("eval", "b"), ("prompt_opt", "b")):
        config = stage_config(project, stage, trial)
        assert "data_path" not in config["task_args"] and "data_ext" not in config["task_args"]
        assert config["data_path"] == data
    from cruijff.stages.prompt_opt import data_file

    assert data_file(stage_config(project, "prompt_opt", "b")) == Path(data)
    assert data_file({"task_args": {"data_path": "/old/d.json"}}) == Path("/old/d.json")


def test_prompt_opt_gives_a_required_system_prompt_where_it_runs(cli, project):
    write_task(project.root, "prompted", OWN_DATA_EVAL.replace(
        'def own_data(split="test", system_prompt="", fewshot=None)',
        'def own_data(system_prompt, fewshot, split="test")'))
    result = build(cli, project, "prompted", "--control", "use_prompt_opt=true")
    assert result.code == 0, result.err
    result = build(cli, project, "prompted", name="unprompted")
    assert result.code == 2 and "requires 'system_prompt'" in result.err
