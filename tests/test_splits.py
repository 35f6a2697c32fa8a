"""Splits at build: which split each stage reads (stage configs, the trial's config.yaml,
`build --json`), a split a trial reads that the dataset lacks refused with the splits it has,
prompt search and eval on the same split refused unless allowed (and then marked), and
cruijff's roles mapped onto a dataset's own split names."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TINY = "cruijff/tiny-llama-random"

SPLIT_EVAL = '''
import json

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.scorer import match
from inspect_ai.solver import generate


@task
def {name}(data_path, {split_arg}):
    records = json.load(open(data_path))[{split}]
    return Task(dataset=MemoryDataset([Sample(input=r["input"], target=r["output"])
                                       for r in records]),
                solver=generate(), scorer=match())
'''

DATA = '''
import json
import os

SPLITS = {splits}


def build(dataset, data_dir):
    words = [a + b for a in "abcd" for b in "xyzw"]
    records = [{{"input": f"Capitalize: {{w}}", "output": w.upper()}} for w in words]
    out = {{}}
    for number, name in enumerate(SPLITS):
        out[name] = records[number * 5:number * 5 + 5]
    with open(os.path.join(data_dir, dataset), "w") as fh:
        json.dump(out, fh)
'''


def split_task(project, name: str, *, default: str | None = "validation",
               splits: tuple[str, ...] = ("train", "validation", "test")) -> Path:
    """A task without prompt arguments that takes `split` (default `default`), or, with
    default None, reads 'validation' itself."""
    folder = project.root / "tasks" / name
    folder.mkdir(parents=True)
    if default is None:
        code = SPLIT_EVAL.format(name=name, split_arg="limit=None", split='"validation"')
    else:
        code = SPLIT_EVAL.format(name=name, split_arg=f"split={default!r}", split="split")
    (folder / "eval.py").write_text(code)
    (folder / "data.py").write_text(DATA.format(splits=list(splits)))
    return folder


def build(cli, project, task: str, *extra: str, name: str = "exp", dataset: str = "s.json"):
    return cli("build", "--config-path", project.config, "--task", task, "--model", TINY,
               "--dataset", dataset, "--name", name, "--root", project.experiments,
               "--control", "use_fine_tune=false", *extra)


def configs(project, name: str = "exp", trial: str = "a") -> dict[str, dict]:
    folder = project.experiments / name / f"trial-{trial}"
    return {stem: yaml.safe_load((folder / f"{stem}.yaml").read_text())
            for stem in ("config", "prompt_opt", "eval") if (folder / f"{stem}.yaml").exists()}


def test_build_says_which_split_each_stage_reads(cli, project):
    split_task(project, "picks", default="test")
    result = build(cli, project, "picks", "--treatment", "use_prompt_opt=true",
                   "--control", "prompt_opt.fewshot.k=2", "--json")
    assert result.code == 0, result.err
    rows = {row["id"]: row for row in json.loads(result.out)["trials"]}
    assert rows["a"]["splits"] == {"eval": {"scoring": "test"}}
    assert rows["b"]["splits"] == {
        "prompt_opt": {"scoring": "validation", "demonstrations": "train"},
        "eval": {"scoring": "test"}}
    trial = configs(project, trial="b")
    assert trial["config"]["splits"] == rows["b"]["splits"]
    assert trial["prompt_opt"]["split"] == "validation"
    assert trial["prompt_opt"]["fewshot"]["split"] == "train"
    assert trial["prompt_opt"]["same_split"] is None
    assert trial["eval"]["task_args"]["split"] == trial["eval"]["reads_split"] == "test"


def test_the_eval_split_is_the_tasks_own_default_when_nothing_sets_it(cli, project):
    split_task(project, "own", default="test")
    assert build(cli, project, "own").code == 0
    evaluation = configs(project)["eval"]
    assert evaluation["task_args"]["split"] == evaluation["reads_split"] == "test"


def test_a_dataset_without_the_validation_split_is_refused_naming_its_splits(cli, project):
    """The toy task's data has train and test only; prompt_opt scores validation."""
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--control", "use_prompt_opt=true",
                 "--root", project.experiments, "--name", "exp")
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "dataset d.json has no split 'validation' (it has 'train', 'test')" in result.err
    assert "trial a's prompt_opt reads (scoring): set prompt_opt.split to one" in result.err
    assert "(splits: {validation: <split>})" in result.err
    assert not (project.experiments / "exp").exists()


def test_an_eval_split_the_dataset_lacks_is_refused_before_anything_runs(cli, project):
    split_task(project, "picks", default="test", splits=("train", "validation"))
    result = build(cli, project, "picks")
    assert result.code == 2
    assert "has no split 'test' (it has 'train', 'validation')" in result.err
    assert "eval reads (scoring): set eval.split to one it has" in result.err
    assert "(splits: {test: <split>})" in result.err  # how to map a role onto one it has


def test_prompt_search_and_eval_on_the_same_split_is_refused_unless_allowed(cli, project):
    """The predecessor's tasks evaluate on validation by default, where the search scores."""
    split_task(project, "same", default="validation", splits=("train", "validation"))
    refused = build(cli, project, "same", "--control", "use_prompt_opt=true")
    assert refused.code == 2
    assert len(refused.err.strip().splitlines()) == 1, refused.err
    assert "the same split 'validation'" in refused.err
    assert "prompt_opt.allow_same_split=true" in refused.err

    allowed = build(cli, project, "same", "--control", "use_prompt_opt=true",
                    "--control", "prompt_opt.allow_same_split=true")
    assert allowed.code == 0, allowed.err
    search = configs(project)["prompt_opt"]
    assert search["allow_same_split"] is True and search["same_split"] == "validation"


def test_demonstrations_from_the_eval_split_are_refused(cli, project):
    split_task(project, "demos", default="test")
    result = build(cli, project, "demos", "--control", "use_prompt_opt=true",
                   "--control", "prompt_opt.fewshot.k=2",
                   "--control", "prompt_opt.fewshot.split=test")
    assert result.code == 2
    assert "prompt_opt's demonstrations and the eval's scoring" in result.err


def test_roles_map_onto_the_datasets_own_split_names(cli, project):
    split_task(project, "mapped", default="test", splits=("train", "dev", "holdout"))
    with project.config.open("a") as fh:
        fh.write("splits:\n  validation: dev\n  test: holdout\n")
    result = build(cli, project, "mapped", "--control", "use_prompt_opt=true",
                   "--control", "prompt_opt.fewshot.k=1", "--json")
    assert result.code == 0, result.err
    trial = configs(project)
    assert trial["prompt_opt"]["split"] == "dev"
    assert trial["prompt_opt"]["fewshot"]["split"] == "train"
    assert trial["eval"]["task_args"]["split"] == trial["eval"]["reads_split"] == "holdout"
    assert json.loads(result.out)["trials"][0]["splits"]["eval"] == {"scoring": "holdout"}


def test_a_mapping_onto_one_split_for_search_and_eval_is_the_same_split(cli, project):
    split_task(project, "onto", default="test", splits=("train", "validation"))
    with project.config.open("a") as fh:
        fh.write("splits: {test: validation}\n")
    result = build(cli, project, "onto", "--control", "use_prompt_opt=true")
    assert result.code == 2
    assert "the same split 'validation'" in result.err
    assert build(cli, project, "onto").code == 0  # without a search, evaluating there is fine
    assert configs(project)["eval"]["reads_split"] == "validation"


def test_a_bad_mapping_is_one_line(cli, project):
    split_task(project, "bad", default="test")
    with project.config.open("a") as fh:
        fh.write("splits: {tset: validation}\n")
    result = build(cli, project, "bad")
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert "unknown key 'splits.tset' (did you mean 'test'?)" in result.err
    project.config.write_text(project.config.read_text().replace("tset: validation",
                                                                 "test: ''"))
    result = build(cli, project, "bad")
    assert result.code == 2 and "splits.test: split name '' must be" in result.err


def test_a_task_that_picks_its_own_split_is_said_to_and_not_guessed(cli, project):
    split_task(project, "own", default=None)
    result = build(cli, project, "own", "--control", "use_prompt_opt=true", "--json")
    assert result.code == 0, result.err
    out = json.loads(result.out)
    assert out["trials"][0]["splits"]["eval"] == {"scoring": None}
    assert any("trial a: the eval reads the split chosen by the task" in w
               and "cannot check" in w for w in out["warnings"])
    trial = configs(project)
    assert trial["eval"]["reads_split"] is None and "split" not in trial["eval"]["task_args"]
    assert trial["prompt_opt"]["split_via"] == "data_copy"


def test_the_fine_tune_reads_the_split_mapped_to_train(cli, project):
    split_task(project, "learns", default="test", splits=("learn", "validation", "test"))
    result = cli("build", "--config-path", project.config, "--task", "learns", "--model", TINY,
                 "--dataset", "l.json", "--name", "exp", "--root", project.experiments)
    assert result.code == 2  # no 'train' split for the fine-tune, said before anything runs
    assert "'train' list" in result.err and not (project.experiments / "exp").exists()
    with project.config.open("a") as fh:
        fh.write("splits: {train: learn}\n")
    result = cli("build", "--config-path", project.config, "--task", "learns", "--model", TINY,
                 "--dataset", "l.json", "--name", "exp", "--root", project.experiments)
    assert result.code == 0, result.err
    finetune = yaml.safe_load((project.experiments / "exp" / "trial-a" / "finetune.yaml")
                              .read_text())
    assert finetune["dataset"]["field"] == "learn"
