"""The task contract as a task written for Inspect expects it: the task folder's own modules
and packages import (and each task gets its own), a missing dependency is refused at build,
and records without ids get stable `<split>-<index>` ids through prompt_opt and analyze."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from cruijff.state import StageRecord, write_record

TINY = "cruijff/tiny-llama-random"

PORTED_EVAL = '''
import helpers
from mypkg.words import WORDS

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ChatMessageAssistant, ChatMessageUser
from inspect_ai.scorer import match
from inspect_ai.solver import generate, system_message


@task
def ported(data_path, data_ext="json", split="test", system_prompt="", fewshot=None):
    records = helpers.read(data_path)[split]
    turns = []
    for demo in fewshot or []:
        turns += [ChatMessageUser(content=demo["input"]),
                  ChatMessageAssistant(content=demo["output"])]
    samples = [Sample(input=[*turns, ChatMessageUser(content=r["input"])] if turns
                      else r["input"], target=r["output"]) for r in records]
    solver = [system_message(system_prompt), generate()] if system_prompt else generate()
    return Task(dataset=MemoryDataset(samples, name=helpers.NAME + str(len(WORDS))),
                solver=solver, scorer=match(location="exact", ignore_case=False))
'''

PORTED_DATA = '''
import json
import os

from mypkg import splits


def build(dataset, data_dir):
    with open(os.path.join(data_dir, dataset), "w") as fh:
        json.dump(splits(), fh)
'''

HELPERS = '''
import json

NAME = "{name}"


def read(path):
    with open(path) as fh:
        return json.load(fh)
'''

PKG_INIT = '''
from mypkg.words import WORDS


def splits():
    records = [{"input": f"Capitalize: {w}", "output": w.upper()} for w in WORDS]
    return {"train": records[:6], "validation": records[6:12], "test": records[12:]}
'''

PKG_WORDS = 'WORDS = [a + b for a in "abcd" for b in "xyzw"]\n'


def write_task(root: Path, name: str, eval_py: str = PORTED_EVAL, helper_name: str = "") -> Path:
    folder = root / "tasks" / name
    (folder / "mypkg").mkdir(parents=True)
    (folder / "eval.py").write_text(eval_py)
    (folder / "data.py").write_text(PORTED_DATA)
    (folder / "helpers.py").write_text(HELPERS.replace("{name}", helper_name or name))
    (folder / "mypkg" / "__init__.py").write_text(PKG_INIT)
    (folder / "mypkg" / "words.py").write_text(PKG_WORDS)
    return folder


def build(cli, project, *extra: str, task: str = "ported", name: str = "exp"):
    return cli("build", "--config-path", project.config, "--task", task, "--model", TINY,
               "--dataset", "p.json", "--name", name, "--root", project.experiments, *extra)


def test_each_task_imports_its_own_sibling_modules_in_one_process(project):
    """Two tasks each with a helpers.py and a mypkg package, loaded one after the other."""
    from cruijff.tasks import load_function

    one = write_task(project.root, "one")
    two = write_task(project.root, "two")
    path_before = list(sys.path)
    load_function(one / "eval.py", "_contract_one_eval", "ported")
    load_function(two / "eval.py", "_contract_two_eval", "ported")
    assert sys.path == path_before  # nothing left on sys.path
    first, second = sys.modules["_contract_one_eval"], sys.modules["_contract_two_eval"]
    assert (first.helpers.NAME, second.helpers.NAME) == ("one", "two")
    assert Path(first.helpers.__file__).parent == one
    assert Path(second.helpers.__file__).parent == two
    assert Path(first.WORDS and sys.modules["mypkg.words"].__file__).parent == two / "mypkg"
    build_one = load_function(one / "data.py", "_contract_one_data", "build")
    assert Path(build_one.__globals__["splits"].__code__.co_filename).parent == one / "mypkg"


def test_a_missing_module_is_refused_at_build_with_one_line(cli, project):
    write_task(project.root, "needs", eval_py="import sklearn_not_installed_here.metrics\n"
               + PORTED_EVAL)
    result = build(cli, project, task="needs")
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "'sklearn_not_installed_here'" in result.err and "eval.py line 1)" in result.err
    assert "pip install sklearn_not_installed_here" in result.err
    assert "Traceback" not in result.err
    assert not any(project.experiments.iterdir())  # nothing half-written
    assert not (project.root / "data" / "p.json").exists()  # no dataset built either


def test_guarded_and_sibling_imports_are_not_missing(cli, project):
    guarded = textwrap.dedent('''
        try:
            import not_installed_optional
        except ImportError:
            not_installed_optional = None
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            import not_installed_for_types
        ''')
    write_task(project.root, "ported", eval_py=guarded + PORTED_EVAL)
    result = build(cli, project, "--dry-run")
    assert result.code == 0, result.err


def test_requirements_txt_names_what_is_not_installed(cli, project):
    folder = write_task(project.root, "ported")
    (folder / "requirements.txt").write_text(
        "# the task's extras\npyyaml\ncruijff-no-such-distribution>=1\n")
    result = build(cli, project)
    assert result.code == 2
    assert "cruijff-no-such-distribution (not installed)" in result.err
    assert "pyyaml" not in result.err.split("needs")[1].split("in cruijff")[0]
    assert f"pip install -r {folder / 'requirements.txt'}" in result.err
    assert not any(project.experiments.iterdir())
    (folder / "requirements.txt").write_text("pyyaml\n")
    assert build(cli, project).code == 0


def run_stage(trial: Path, stage: str, model: str | None = None, **keys) -> None:
    """Run a built stage's own command (as a run would), optionally on another model."""
    config_path = trial / f"{stage}.yaml"
    config = yaml.safe_load(config_path.read_text())
    if model:
        config["model"], config["model_args"] = model, {}
    config.update(keys)
    config_path.write_text(yaml.safe_dump(config))
    command = yaml.safe_load((trial / "config.yaml").read_text())["commands"][stage]
    proc = subprocess.run(command, cwd=trial, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_task_with_its_own_modules_evaluates_the_tiny_model(cli, project):
    """Build (data.py imports mypkg) and a real eval (eval.py imports helpers, mypkg)."""
    write_task(project.root, "ported")
    result = build(cli, project, "--control", "use_fine_tune=false", "--control",
                   "eval.limit=2")
    assert result.code == 0, result.err
    trial = project.experiments / "exp" / "trial-a"
    run_stage(trial, "eval")
    from inspect_ai.log import list_eval_logs, read_eval_log

    [info] = list_eval_logs(str(trial / "logs" / "eval"))
    log = read_eval_log(info)
    assert log.status == "success"
    assert log.eval.dataset.name == "ported16"  # helpers.NAME + len(mypkg.words.WORDS)
    assert [s.id for s in log.samples] == ["test-0", "test-1"]


def test_records_without_ids_through_prompt_opt_and_analyze(cli, project):
    """The scripted test double capitalizes only when told CAPITALS; ids are split-index."""
    write_task(project.root, "ported")
    result = build(cli, project, "--control", "use_fine_tune=false", "--treatment",
                   "use_prompt_opt=true", "--controls", json.dumps({
                       "prompt_opt.system_prompts": ["Repeat.", "Answer in CAPITALS."],
                       "prompt_opt.fewshot.k": 2}))
    assert result.code == 0, result.err
    exp = project.experiments / "exp"
    scripted = "cruijff-scripted/capitalizer"
    run_stage(exp / "trial-b", "prompt_opt", scripted)
    rows = list(csv.DictReader((exp / "trial-b" / "prompt_opt" / "candidates.csv").open()))
    assert len(rows) == 4
    seen = {i for r in rows for i in r["validation_sample_ids"].split()}
    assert seen == {f"validation-{i}" for i in range(6)}
    demos = {i for r in rows if "shots" in r["label"]
             for i in r["label"].split("shots ")[1].split(",")}
    assert len(demos) == 2 and demos <= {f"train-{i}" for i in range(6)}
    chosen = yaml.safe_load((exp / "trial-b" / "prompt_opt" / "chosen.yaml").read_text())
    assert chosen["score"] == 1.0

    from cruijff.registry import STAGES

    for trial in ("trial-a", "trial-b"):
        run_stage(exp / trial, "eval", scripted)
        config = yaml.safe_load((exp / trial / "eval.yaml").read_text())
        verified = STAGES["eval"].verify(exp / trial, config)
        write_record(exp / trial, StageRecord("eval", "eval-key", "done",
                                              outputs=verified.outputs,
                                              metrics=verified.metrics))
    analyzed = cli("analyze", exp, "--json", "--format", "none")
    assert analyzed.code == 0, analyzed.err
    report = json.loads(analyzed.out)
    metrics = {t["id"]: t["metric"] for t in report["trials"]}
    assert metrics["a"]["n"] == metrics["b"]["n"] == 4
    assert metrics["a"]["value"] == 0.0 and metrics["b"]["value"] == 1.0
    paired = report["trials"][1]["vs_control"]
    assert (paired["n"], paired["wins"], paired["losses"]) == (4, 4, 0)
    with sqlite3.connect(exp / "results.sqlite") as db:
        ids = {row[0] for row in db.execute("select sample_id from samples")}
    assert ids == {f"test-{i}" for i in range(4)}
