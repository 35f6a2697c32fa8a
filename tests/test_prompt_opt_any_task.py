"""Prompt optimization on a task written for Inspect alone: no `system_prompt`, `fewshot` or
`split` arguments. cruijff applies each candidate around the task's own solver, scores it on
validation records only, and the eval applies the chosen candidate the same way; what the
model is given is read back from the Inspect logs and from a recording test double."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml
from inspect_ai.model import (
    ChatMessage,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    modelapi,
)
from test_task_contract import HELPERS as TASK_HELPERS

TINY = "cruijff/tiny-llama-random"
SCRIPTED = "cruijff-scripted/capitalizer"
MIMIC = "cruijff-test-mimic/m"

PLAIN_EVAL = '''
import helpers

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.scorer import match
from inspect_ai.solver import generate, prompt_template


@task
def {name}(data_path{split_arg}):
    """Written for Inspect, not for cruijff: it reads its own split unless given one."""
    records = helpers.read(data_path)[{split}]
    samples = [Sample(input=r["input"], target=r["output"]) for r in records]
    return Task(dataset=MemoryDataset(samples, name=helpers.NAME),
                solver=[prompt_template("{{prompt}}"), generate()],
                scorer=match(location="exact", ignore_case=False))
'''

HELPERS = TASK_HELPERS.replace("{name}", "plain")  # the ported task's helpers.py

DATA = '''
import json
import os


def build(dataset, data_dir):
    words = [a + b for a in "abcd" for b in "xyzw"]
    records = [{"input": f"Capitalize: {w}", "output": w.upper()} for w in words]
    splits = {"train": records[:6], "validation": records[6:11], "test": records[11:]}
    with open(os.path.join(data_dir, dataset), "w") as fh:
        json.dump(splits, fh)
'''


INPUTS: list[list[tuple[str, str]]] = []
"""Every input the Mimic test double was given, as (role, text) turns."""


@modelapi(name="cruijff-test-mimic")
class Mimic(ModelAPI):
    """Answers in capitals only when the conversation shows an earlier assistant turn in
    capitals (a demonstration); records every input it is given in INPUTS."""

    def __init__(self, model_name: str, base_url: str | None = None,
                 api_key: str | None = None, config: GenerateConfig | None = None,
                 **model_args: Any) -> None:
        super().__init__(model_name, base_url, api_key, [], config or GenerateConfig())

    async def generate(self, input: list[ChatMessage], tools: list, tool_choice: Any,
                       config: GenerateConfig) -> ModelOutput:
        INPUTS.append([(m.role, m.text) for m in input])
        word = input[-1].text.rsplit(":", 1)[-1].strip()
        shown = any(m.role == "assistant" and m.text.isupper() for m in input[:-1])
        return ModelOutput.from_content(model=self.model_name,
                                        content=word.upper() if shown else word)


def plain_task(project, name: str = "plain", *, takes_split: bool = False) -> Path:
    folder = project.root / "tasks" / name
    folder.mkdir(parents=True)
    (folder / "eval.py").write_text(PLAIN_EVAL.format(
        name=name, split_arg=', split="test"' if takes_split else "",
        split="split" if takes_split else '"validation"'))
    (folder / "helpers.py").write_text(HELPERS)
    (folder / "data.py").write_text(DATA)
    return folder


def build(cli, project, task: str, *extra: str) -> Path:
    result = cli("build", "--config-path", project.config, "--task", task, "--model", TINY,
                 "--dataset", "p.json", "--name", "exp", "--root", project.experiments,
                 "--control", "use_fine_tune=false", *extra)
    assert result.code == 0, result.err
    return project.experiments / "exp"


def set_model(trial: Path, stage: str, model: str, **keys: Any) -> Path:
    path = trial / f"{stage}.yaml"
    config = yaml.safe_load(path.read_text())
    config.update({"model": model, "model_args": {}, **keys})
    path.write_text(yaml.safe_dump(config))
    return path


def run_stage(trial: Path, stage: str) -> None:
    """The stage's own command, as a run would start it."""
    command = yaml.safe_load((trial / "config.yaml").read_text())["commands"][stage]
    proc = subprocess.run(command, cwd=trial, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def model_inputs(log_dir: Path) -> list[list[tuple[str, str]]]:
    """What the model was given, per sample, from the model events of Inspect's logs."""
    from inspect_ai.log import list_eval_logs, read_eval_log

    found = []
    for info in list_eval_logs(str(log_dir)):
        for sample in read_eval_log(info).samples or []:
            for event in sample.events:
                if event.event == "model":
                    found.append([(m.role, m.text) for m in event.input])
    return found


def test_an_unchanged_task_is_optimized_and_evaluated_with_the_scripted_model(cli, project):
    """No split, system_prompt or fewshot argument: the search scores validation records
    only (a copy of the data holding nothing else), and the chosen system prompt reaches the
    model in prompt_opt and in the eval."""
    plain_task(project)
    exp = build(cli, project, "plain", "--treatment", "use_prompt_opt=true",
                "--controls", json.dumps({
                    "prompt_opt.system_prompts": ["Repeat.", "Answer in CAPITALS."],
                    "prompt_opt.fewshot.k": 2}))
    trial = exp / "trial-b"
    search = yaml.safe_load((trial / "prompt_opt.yaml").read_text())
    assert search["wrap"] == ["system_prompt", "fewshot"]
    assert search["split_via"] == "data_copy"
    set_model(trial, "prompt_opt", SCRIPTED)
    run_stage(trial, "prompt_opt")

    rows = list(csv.DictReader((trial / "prompt_opt" / "candidates.csv").open()))
    assert len(rows) == 4
    seen = {i for r in rows for i in r["validation_sample_ids"].split()}
    assert seen == {f"validation-{i}" for i in range(5)}
    data = json.loads((project.root / "data" / "p.json").read_text())
    asked = {text for turns in model_inputs(trial / "logs" / "prompt_opt")
             for role, text in turns[-1:]}
    assert asked == {r["input"] for r in data["validation"]}  # never a test record
    chosen = yaml.safe_load((trial / "prompt_opt" / "chosen.yaml").read_text())
    assert chosen["score"] == 1.0 and chosen["task_args"] == {}
    assert chosen["prompt"] == {"system_prompt": "Answer in CAPITALS.", "fewshot": []}
    shot = next(r for r in rows if r["candidate"] == "4")  # CAPITALS with two demonstrations
    demos = shot["label"].split("shots ")[1].split(",")
    turns = model_inputs(trial / "logs" / "prompt_opt" / "c4")[0]
    train = [data["train"][int(d.split("-")[1])] for d in demos]
    assert turns[:5] == [("system", "Answer in CAPITALS."),
                         ("user", train[0]["input"]), ("assistant", train[0]["output"]),
                         ("user", train[1]["input"]), ("assistant", train[1]["output"])]

    evaluation = yaml.safe_load((trial / "eval.yaml").read_text())
    assert evaluation["prompt"] == chosen["prompt"]
    assert evaluation["reads_split"] is None  # the task reads its own split
    set_model(trial, "eval", SCRIPTED)
    run_stage(trial, "eval")
    from cruijff.registry import STAGES

    verified = STAGES["eval"].verify(trial, yaml.safe_load((trial / "eval.yaml").read_text()))
    assert verified.metrics["accuracy"] == 1.0
    assert all(turns[0] == ("system", "Answer in CAPITALS.")
               for turns in model_inputs(trial / "logs" / "eval"))
    verified = STAGES["prompt_opt"].verify(trial, search)
    assert verified.metrics["chosen"] == 3


def test_chosen_demonstrations_reach_the_model_in_prompt_opt_and_eval(cli, project):
    """In this process, with a test double that answers well only after demonstrations: the
    2-shot candidate wins, and the eval gives the model the same system prompt and turns.
    The task takes `split` (so it is passed), but no prompt arguments."""
    from cruijff.registry import STAGES

    plain_task(project, "splitting", takes_split=True)
    exp = build(cli, project, "splitting", "--control", "use_prompt_opt=true",
                "--controls", json.dumps({"prompt_opt.system_prompts": ["Be brief."],
                                          "prompt_opt.fewshot.k": 2}))
    trial = exp / "trial-a"
    search_path = set_model(trial, "prompt_opt", MIMIC)
    search = yaml.safe_load(search_path.read_text())
    assert search["split_via"] == "argument" and search["wrap"] == ["system_prompt", "fewshot"]
    INPUTS.clear()
    assert STAGES["prompt_opt"].execute(search_path) == 0
    chosen = yaml.safe_load((trial / "prompt_opt" / "chosen.yaml").read_text())
    assert chosen["candidate"] == 2 and chosen["score"] == 1.0
    demos = chosen["prompt"]["fewshot"]
    assert len(demos) == 2 and {d["id"] for d in demos} <= {f"train-{i}" for i in range(6)}
    expected = [("system", "Be brief.")] + [
        turn for d in demos for turn in (("user", d["input"]), ("assistant", d["output"]))]
    data = json.loads((project.root / "data" / "p.json").read_text())
    searched = [turns for turns in INPUTS if len(turns) > 2]
    assert searched and all(turns[:-1] == expected for turns in searched)
    assert {turns[-1][1] for turns in INPUTS} == {r["input"] for r in data["validation"]}

    eval_path = set_model(trial, "eval", MIMIC)
    assert yaml.safe_load(eval_path.read_text())["prompt"] == chosen["prompt"]
    INPUTS.clear()
    assert STAGES["eval"].execute(eval_path) == 0
    assert [turns[:-1] for turns in INPUTS] == [expected] * len(data["test"])
    assert {turns[-1][1] for turns in INPUTS} == {r["input"] for r in data["test"]}
    verified = STAGES["eval"].verify(trial, yaml.safe_load(eval_path.read_text()))
    assert verified.metrics["accuracy"] == 1.0
    assert STAGES["prompt_opt"].verify(trial, search).metrics["chosen"] == 2


def test_the_tiny_model_is_evaluated_with_a_wrapped_prompt(cli, project):
    """A real eval on the tiny model: system prompt and a demonstration as chat turns."""
    plain_task(project, "splitting", takes_split=True)
    exp = build(cli, project, "splitting", "--control", "eval.limit=2")
    trial = exp / "trial-a"
    config = yaml.safe_load((trial / "eval.yaml").read_text())
    demo = {"id": "train-0", "input": "Capitalize: ax", "output": "AX"}
    config["prompt"] = {"system_prompt": "Answer in CAPITALS.", "fewshot": [demo]}
    (trial / "eval.yaml").write_text(yaml.safe_dump(config))
    run_stage(trial, "eval")
    inputs = model_inputs(trial / "logs" / "eval")
    assert len(inputs) == 2
    assert all(turns[:3] == [("system", "Answer in CAPITALS."), ("user", "Capitalize: ax"),
                             ("assistant", "AX")] and len(turns) == 4 for turns in inputs)


def test_a_task_taking_the_prompt_arguments_keeps_control(cli, project):
    """The example's capitalization task takes split, system_prompt and fewshot."""
    import shutil

    from conftest import EXAMPLE

    shutil.copytree(EXAMPLE / "tasks" / "capitalization", project.root / "tasks" / "cap")
    (project.root / "tasks" / "cap" / "eval.py").write_text(
        (EXAMPLE / "tasks" / "capitalization" / "eval.py").read_text()
        .replace("def capitalization(", "def cap("))
    result = cli("build", "--config-path", project.config, "--task", "cap", "--model", TINY,
                 "--dataset", "words_5L_80_100.json", "--name", "exp", "--root",
                 project.experiments, "--control", "use_fine_tune=false",
                 "--control", "use_prompt_opt=true")
    assert result.code == 0, result.err
    search = yaml.safe_load((project.experiments / "exp" / "trial-a" / "prompt_opt.yaml")
                            .read_text())
    assert search["wrap"] == [] and search["split_via"] == "argument"


def test_a_task_that_cruijff_cannot_point_at_validation_is_refused(cli, project):
    folder = project.root / "tasks" / "fixed"
    folder.mkdir(parents=True)
    (folder / "eval.py").write_text(
        "from inspect_ai import Task, task\n\n\n@task\ndef fixed(limit=3):\n"
        "    raise NotImplementedError\n")
    (folder / "data.py").write_text(DATA)
    result = cli("build", "--config-path", project.config, "--task", "fixed", "--model", TINY,
                 "--dataset", "p.json", "--root", project.experiments,
                 "--control", "use_fine_tune=false", "--control", "use_prompt_opt=true")
    assert result.code == 2
    assert "takes neither `split` nor `data_path`" in result.err
