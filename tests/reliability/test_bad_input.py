"""Bad input: one clear line, exit code 2, no traceback, and no experiment left behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from rich.console import Console

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


def write_text(name: str, text: str):
    def setup(project):
        (project.experiments / name).write_text(text, encoding="utf-8")
    return setup


def write_config_bytes(content: bytes):
    def setup(project):
        project.config.write_bytes(content)
    return setup


DEEP = "[" * 100_000
"""Unclosed: parsers recurse into it (a RecursionError before anything could say why)."""
NESTED_99 = "[" * 99 + "]" * 99
"""Readable, but as a value written into the experiment's files it nests over the limit."""
HUGE_INT = "1" * 5000
"""More digits than Python converts (sys.get_int_max_str_digits(), 4300)."""
ELEVEN_MB = 11 * 1024 * 1024

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
    ("task-required-arg-unset",
     edit_task("eval.py",
               "from inspect_ai import task\n@task\ndef toy(data_path, extra, split=''): ...\n"),
     [], "requires 'extra'"),
    ("eval-syntax-error", edit_task("eval.py", "def toy(:\n"), [], "eval.py line 1"),
    ("eval-yaml-unknown-arg", edit_task("eval.yaml", "shotz: 1\n"), [],
     "eval.yaml sets 'shotz'"),
    ("dataset-build-writes-nothing", None, ["--dataset", "nothing.json"], "did not write"),
    ("unknown-task", None, ["--task", "nope"], "task 'nope' not found"),
    ("model-missing-offline", None, ["--model", "org/absent-model"], "offline"),
    ("model-folder-traversal", None, ["--model", "../../etc/passwd"], "does not exist"),
    ("model-folder-a-file", None, ["--model", "/etc/passwd"], "/etc/passwd is not a folder"),
    ("model-folder-not-a-model", None, ["--model", "/etc"], "/etc has no config.json"),
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
    # nesting and size: bounded before anything recurses or reads it all
    ("deep-json-inline", None, ["--treatments", DEEP], "nested more than 100 levels deep"),
    ("deep-json-file", write_text("deep.json", '{"eval.task_args.split": ' + "[" * 5000
                                  + "]" * 5000 + "}"),
     ["--treatment-path", "deep.json"], "nested more than 100 levels deep"),
    ("deep-value-in-written-files", None,
     ["--treatments", '{"eval.generate.stop_seqs": ' + NESTED_99 + "}"],
     "cannot write a value: nested more than 100 levels deep"),
    ("deep-yaml-treatment-value", None, ["--treatment", "eval.task_args.split=" + DEEP],
     "nested more than 100 levels deep"),
    ("deep-yaml-config", add_config("extra: " + DEEP + "\n"), [],
     "nested more than 100 levels deep"),
    ("deep-yaml-eval-yaml", edit_task("eval.yaml", "split: " + "[" * 5000 + "]" * 5000 + "\n"),
     [], "nested more than 100 levels deep"),
    ("huge-json-inline", None, ["--treatments", '{"a": "' + "x" * ELEVEN_MB + '"}'],
     "the limit is 10485760"),
    ("huge-json-file", write_file("huge.json", b'{"a": "' + b"x" * ELEVEN_MB + b'"}'),
     ["--treatment-path", "huge.json"], "the limit is 10485760"),
    ("huge-yaml-config", add_config("# " + "x" * ELEVEN_MB + "\n"), [], "the limit is 10485760"),
    ("treatment-path-device", None, ["--treatment-path", "/dev/zero"], "is not a file"),
    ("treatment-path-folder", None, ["--treatment-path", "."], "is not a file"),
    # values the parsers cannot hold
    ("json-huge-integer", None, ["--treatments", '{"finetune.model.lora_rank": ' + HUGE_INT + "}"],
     "a number has more than 4300 digits"),
    ("yaml-huge-hex-integer", None, ["--control", "finetune.model.lora_rank=0x" + "f" * 5000],
     "is not a valid integer"),
    ("json-nan", None, ["--treatments", '{"finetune.model.lora_rank": NaN}'],
     "NaN is not a JSON number"),
    ("json-lone-surrogate", None, ["--treatments", '{"eval.generate.system_message": "\\ud800"}'],
     "not a Unicode character"),
    ("yaml-bool-tag", edit_task("eval.yaml", "split: !!bool maybe\n"), [],
     "'maybe' is not a valid boolean"),
    ("yaml-set-tag", edit_task("eval.yaml", "split: !!set {a: null}\n"), [],
     "the tag tag:yaml.org,2002:set is not allowed"),
    ("config-impossible-date", add_config("run_control_trials: 2024-13-45\n"), [],
     "run_control_trials"),
    ("eval-yaml-python-tag",
     edit_task("eval.yaml", "split: !!python/object/apply:os.system [touch CANARY]\n"), [],
     "invalid YAML"),
    ("config-not-utf8", write_config_bytes(b"model_dir: m\xff\n"), [], "not UTF-8"),
    ("nul-in-value", None, ["--treatment", 'eval.generate.system_message="a\\0b"'],
     "control character '\\x00'"),
    ("terminal-escape-in-value", None,
     ["--treatments", '{"eval.generate.system_message": "\\u001b[2J"}'],
     "control character '\\x1b'"),
    # injection and paths where a name is expected
    ("partition-injection", add_config('    partition: "gpu;touch CANARY"\n'), [], "partition"),
    ("partition-sbatch-line", add_config('    partition: "gpu\\n#SBATCH --uid=0"\n'), [],
     "partition"),
    ("model-injection", None, ["--model", "org/x;touch CANARY"], "not a Hugging Face id"),
    ("model-trailing-newline", None, ["--model", TINY + "\n"],
     "must not start or end with spaces"),
    ("treatment-model-injection", None,
     ["--treatments", '{"model": "org/$(touch CANARY)"}'], "not a Hugging Face id"),
    ("dataset-absolute", None, ["--dataset", "/etc/passwd"], "must be a plain file name"),
    ("dataset-trailing-newline", None, ["--dataset", "d.json\n"],
     "must not start or end with spaces"),
    ("experiment-name-absolute", None, ["--name", "/tmp/x"], "experiment name '/tmp/x'"),
    ("experiment-name-sbatch-line", None, ["--name", "exp\n#SBATCH --uid=0"],
     "experiment name"),
    ("experiment-name-trailing-newline", None, ["--name", "exp\n"], "exp\\n"),
    ("task-traversal", None, ["--task", "../toy"], "task '../toy' must be a plain file name"),
    ("task-absolute", None, ["--task", "/etc"], "task '/etc' must be a plain file name"),
    ("key-trailing-newline", None, ["--treatments", '{"torchtune.model.lora_rank\\n": 4}'],
     "has an invalid part"),
    # stage keys naming places cruijff fills in: a run would write (and --force move) there
    ("managed-output-dir", None, ["--treatment", "finetune.output_dir=/tmp/elsewhere"],
     "key 'finetune.output_dir' names a file or folder that cruijff sets itself"),
    ("managed-key-inside-mapping", None,
     ["--treatments", '{"finetune.metric_logger": {"log_dir": "/tmp/elsewhere"}}'],
     "key 'finetune.metric_logger.log_dir' names a file or folder"),
    ("managed-data-path", None, ["--control", "eval.data_path=/etc/passwd"],
     "key 'eval.data_path' names a file or folder"),
    ("managed-prompt-opt-eval-config", None,
     ["--treatments", '{"use_prompt_opt": true, "prompt_opt.eval_config": "/tmp/x.yaml"}'],
     "key 'prompt_opt.eval_config' names a file or folder"),
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


def _payloads(canary) -> list[str]:
    """Shell and #SBATCH injection attempts, as a researcher's string value could hold them."""
    return [f"$(touch {canary})", f"`touch {canary}`", f"x\n#SBATCH --uid=0\ntouch {canary}",
            f"'; touch {canary}; echo '", f"x\r#SBATCH --wrap='touch {canary}'",
            f"\"; touch {canary} #"]


def test_hostile_strings_in_string_values_stay_data(cli, project, tmp_path):
    """A string value (a system message, a task argument) may legitimately hold anything:
    it goes into the stage's YAML only. The generated .slurm scripts keep their #SBATCH
    block, mention the value only on one comment line, and when bash runs them they run
    exactly the recorded command (exec is stubbed) and never the payload."""
    canary = tmp_path / "CANARY"
    treatments = [{"eval.generate.system_message": p} for p in _payloads(canary)]
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--name", "exp", "--treatments", json.dumps(treatments),
                 "--control", f"eval.model_args.note='$(touch {canary})'",
                 cwd=project.experiments)
    assert result.code == 0, result.err
    experiment = project.experiments / "exp"
    scripts = sorted(experiment.glob("trial-*/*.slurm"))
    assert len(scripts) == 2 * (1 + len(treatments))  # finetune + eval per trial
    allowed = {"job-name", "output", "nodes", "ntasks-per-node", "time", "account", "mem",
               "gres"}
    for script in scripts:
        lines = script.read_text(encoding="utf-8").split("\n")
        directives = [line for line in lines if line.startswith("#SBATCH")]
        assert {d.split()[1].split("=")[0].lstrip("-") for d in directives} == allowed
        assert len(directives) == len(allowed), directives
        assert all(line.startswith("# experiment exp, trial ")
                   for line in lines if "touch" in line or "uid" in line), lines
        argv = tmp_path / f"argv-{script.parent.name}-{script.stem}"
        run = subprocess.run(
            ["bash", "-c", 'exec() { printf "%s\\n" "$@" > "$ARGV"; }; source "$1"', "_",
             str(script)], env={"ARGV": str(argv), "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert argv.read_text(encoding="utf-8").splitlines() == [
            sys.executable, "-m", "cruijff", "stage", str(script.parent), script.stem]
    eval_yaml = yaml.safe_load((experiment / "trial-b" / "eval.yaml").read_text())
    assert eval_yaml["generate"]["system_message"] == _payloads(canary)[0]
    assert eval_yaml["model_args"]["note"] == f"$(touch {canary})"
    assert not canary.exists()


def test_markup_in_a_value_is_shown_not_interpreted(cli, project, monkeypatch):
    # The label on one line of the table. (Not COLUMNS: a console takes it when cruijff.cli is
    # imported, and under pytest-xdist that happens with the worker's COLUMNS=80.)
    monkeypatch.setattr("cruijff.cli.out", Console(highlight=False, width=300))
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--name", "exp", "--treatments",
                 '{"eval.generate.system_message": "[/oops] [bold]x"}', cwd=project.experiments)
    assert result.code == 0, result.err
    assert "[/oops] [bold]x" in result.out


@pytest.mark.parametrize("field", ["account", "partition", "time", "gres", "qos"])
def test_a_final_newline_in_a_slurm_value_is_refused(cli, project, field):
    value = {"time": "00:30:00", "gres": "gpu"}.get(field, "cses")
    config = project.config.read_text()
    config = "\n".join(line for line in config.splitlines()
                       if not line.strip().startswith(f"{field}:"))
    project.config.write_text(config + f'\n    {field}: "{value}\\n"\n')
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--name", "exp", cwd=project.experiments)
    assert result.code == 2, result.out
    assert field in result.err and not (project.experiments / "exp").exists()


# Resource keys: only an allow-list of Slurm requests passes through to sbatch

UNSAFE_RESOURCES = [
    # (key, value): each would set a job's environment, files, folder, command or identity
    ("export", "ALL,PYTHONPATH=/tmp/x"),  # every Python of the job imports /tmp/x/sitecustomize
    ("output", "/tmp/x.out"),  # a second --output: the job's log outside the experiment
    ("error", "/tmp/x.err"),
    ("chdir", "/"),
    ("wrap", "id"),
    ("job_name", "other"),
    ("export_file", "/tmp/env"),
    ("uid", 0),
    ("get_user_env", True),
    ("mail_user", "someone@example.org"),  # decided: no mail to any address from a config
    ("mail_type", "END"),
    ("container", "/tmp/image"),
]


@pytest.mark.parametrize(("key", "value"), UNSAFE_RESOURCES, ids=[k for k, _ in UNSAFE_RESOURCES])
def test_a_resource_key_outside_the_allow_list_is_refused_at_build(cli, project, key, value):
    """Before, any key passed through as `--key=value` if its value had no odd character."""
    project.config.write_text(project.config.read_text() + f"    {key}: {json.dumps(value)}\n")
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--name", "exp", cwd=project.experiments)
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert f"resource key '{key}'" in lines[0] and "remove it" in lines[0], lines[0]
    assert "Traceback" not in result.err + result.out
    assert [p.name for p in project.experiments.iterdir()] == []


def test_the_refusal_says_which_keys_pass_through(cli, project):
    project.config.write_text(project.config.read_text() + "    export: NONE\n")
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--name", "exp", cwd=project.experiments)
    assert result.code == 2
    assert "these pass through: " in result.err and "qos" in result.err


def test_a_resource_key_edited_into_a_trial_config_is_refused_by_a_slurm_run(cli, project):
    """The trial config's resources make the worker jobs: they are checked again there."""
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--name", "exp", cwd=project.experiments)
    assert result.code == 0, result.err
    config = project.experiments / "exp" / "trial-a" / "config.yaml"
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["resources"]["export"] = "ALL,PYTHONPATH=/tmp/x"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = cli("run", "--executor", "slurm", "--dry-run", project.experiments / "exp",
                 cwd=project.experiments)
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "trial-a/config.yaml: resources: resource key 'export'" in lines[0]
    assert "PYTHONPATH" not in result.out


def test_allowed_resource_keys_reach_the_scripts_and_the_worker_jobs(cli, project):
    project.config.write_text(project.config.read_text() + "    qos: high\n"
                              "    constraint: a100\n")
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--name", "exp", cwd=project.experiments)
    assert result.code == 0, result.err
    experiment = project.experiments / "exp"
    scripts = sorted(experiment.glob("trial-*/*.slurm"))
    assert scripts
    for script in scripts:
        lines = script.read_text(encoding="utf-8").splitlines()
        assert "#SBATCH --qos=high" in lines and "#SBATCH --constraint=a100" in lines
    result = cli("run", "--executor", "slurm", "--dry-run", experiment, cwd=project.experiments)
    assert result.code == 0, result.err
    directives = [line.strip() for line in result.out.splitlines()
                  if line.strip().startswith("#SBATCH")]
    assert "#SBATCH --qos=high" in directives and "#SBATCH --constraint=a100" in directives
