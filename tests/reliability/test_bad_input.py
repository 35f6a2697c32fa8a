"""Bad input: one clear line, exit code 2, no traceback, and no experiment left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

TINY = "cruijff/tiny-llama-random"


def edit_task(file: str, text: str):
    def setup(project):
        project.task("toy").joinpath(file).write_text(text)
    return setup


def edit_config(old: str, new: str):
    def setup(project):
        project.config.write_text(project.config.read_text().replace(old, new))
    return setup


def add_config(text: str):
    def setup(project):
        project.config.write_text(project.config.read_text() + text)
    return setup


def write_file(name: str, content: bytes):
    def setup(project):
        (project.experiments / name).write_bytes(content)
    return setup


TWO_TASKS = "from inspect_ai import task\n@task\ndef a(data_path, data_ext): ...\n" \
            "@task\ndef b(data_path, data_ext): ...\n"

CASES = [
    # (id, setup, extra build args, what the one line must say)
    ("unknown-key", None, ["--control", "torchtune.model.lora_rnk=4"],
     "has no 'lora_rnk' under 'model' (did you mean 'lora_rank'?)"),
    ("unknown-namespace", None, ["--control", "torchtun.model.lora_rank=4"],
     "unknown namespace 'torchtun'"),
    ("unknown-trial-key", None, ["--treatment", "modle=org/x"], "unknown key 'modle'"),
    ("malformed-json", None, ["--treatments", '{"finetune.model.lora_rank": 4'], "malformed JSON"),
    ("json-not-object", None, ["--controls", "[1, 2]"], "must be a JSON object"),
    ("json-list-of-non-objects", None, ["--treatments", "[1]"], "must be a JSON object"),
    ("missing-treatment-file", None, ["--treatment-path", "nope.json"], "not found"),
    ("non-utf8-file", write_file("bad.json", b'{"a": "\xff\xfe"}'),
     ["--treatment-path", "bad.json"], "not UTF-8"),
    ("task-without-build", edit_task("data.py", "def make(dataset, data_dir): ...\n"), [],
     "data.py must define build(dataset, data_dir)"),
    ("build-wrong-signature", edit_task("data.py", "def build(dataset): ...\n"), [],
     "build must take (dataset, data_dir)"),
    ("two-tasks", edit_task("eval.py", TWO_TASKS), [], "exactly one @task (found 2: a, b)"),
    ("no-task", edit_task("eval.py", "def toy(data_path, data_ext): ...\n"), [],
     "exactly one @task (found 0)"),
    ("task-lacks-data-path",
     edit_task("eval.py", "from inspect_ai import task\n@task\ndef toy(split='test'): ...\n"),
     [], "must accept data_path"),
    ("eval-syntax-error", edit_task("eval.py", "def toy(:\n"), [], "eval.py line 1"),
    ("eval-yaml-unknown-arg", edit_task("eval.yaml", "shotz: 1\n"), [],
     "eval.yaml sets 'shotz'"),
    ("dataset-build-writes-nothing", None, ["--dataset", "nothing.json"], "did not write"),
    ("unknown-task", None, ["--task", "nope"], "task 'nope' not found"),
    ("model-missing-offline", None, ["--model", "org/absent-model"], "offline"),
    ("model-id-traversal", None, ["--model", "../../etc/passwd"], "not a Hugging Face id"),
    ("treatment-without-equals", None, ["--treatment", "torchtune.model.lora_rank"],
     "must be KEY=VALUE"),
    ("wrong-type", None, ["--control", "torchtune.model.lora_rank=abc"], "expects an integer"),
    ("wrong-type-trial-key", None, ["--treatment", "use_fine_tune=maybe"], "must be a boolean"),
    ("unknown-task-arg", None, ["--control", "eval.task_args.shotz=1"],
     "has no argument 'shotz' (did you mean 'shots'?)"),
    ("unknown-generate-field", None, ["--control", "eval.generate.max_tokenz=1"],
     "not an Inspect GenerateConfig field"),
    ("key-for-stage-not-run", None,
     ["--control", "use_fine_tune=false", "--control", "finetune.model.lora_rank=4"],
     "applies to no trial: none runs the finetune stage"),
    ("treatment-key-for-stage-not-run", None,
     ["--treatments", '{"use_fine_tune": false, "finetune.model.lora_rank": 4}'],
     "which does not run the finetune stage"),
    ("empty-treatment", None, ["--treatments", "{}"], "treatment is empty"),
    ("account-injection", edit_config("account: cses", 'account: "x\\n#SBATCH --uid=0"'), [],
     "account"),
    ("time-injection", edit_config('time: "00:30:00"', 'time: "$(reboot)"'), [],
     "is not a Slurm time"),
    ("gres-injection", edit_config("gres: 1", 'gres: "gpu;rm -rf /"'), [], "gres"),
    ("passthrough-injection", add_config('    qos: "normal --uid=0"\n'), [], "qos"),
    ("passthrough-key-injection", add_config('    "qos --uid": x\n'), [], "resource key"),
    ("dataset-traversal", None, ["--dataset", "../secrets.json"], "must be a plain file name"),
    ("experiment-name-traversal", None, ["--name", "../elsewhere"], "experiment name"),
    ("config-unknown-key", add_config("use_finetune: true\n"), [],
     "did you mean 'use_fine_tune'?"),
    ("config-yaml-python-tag", add_config("extra: !!python/object/apply:os.system [id]\n"), [],
     "invalid YAML"),
    ("config-billion-laughs", edit_config("model_dir: models", "a: &a [x, x]\nb: [*a, *a]"),
     [], "aliases"),
    ("config-malformed-yaml", add_config("resources: [\n"), [], "invalid YAML"),
]


@pytest.mark.parametrize(("setup", "extra", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_exit_2(cli, project, setup, extra, expected):
    if setup:
        setup(project)
    args = ["build", "--config-path", project.config, "--task", "toy", "--model", TINY,
            "--dataset", "d.json", "--treatment", "torchtune.model.lora_rank=4", "--name", "exp"]
    # later options win for single-valued ones; repeatable ones accumulate
    for option in ("--task", "--name"):
        if option in extra:
            index = args.index(option)
            del args[index:index + 2]
    result = cli(*args, *extra, cwd=project.experiments)
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert expected in lines[0]
    assert "Traceback" not in result.err + result.out
    leftovers = [p.name for p in project.experiments.iterdir() if p.suffix != ".json"]
    assert leftovers == [], leftovers
    assert not (project.root / "elsewhere").exists()


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_the_installed_command_prints_no_traceback(project):
    """The real console script, not the in-process runner: exit 2 and one line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "cruijff", "build", "--config-path", str(project.config),
         "--task", "toy", "--model", TINY, "--dataset", "d.json", "--treatments", "{oops"],
        capture_output=True, text=True, cwd=project.experiments, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --treatments: malformed JSON")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
