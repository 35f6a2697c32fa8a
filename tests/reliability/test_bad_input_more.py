"""More bad input: task code that exits, roots that cannot hold an experiment, malformed
CRUIJFF_* variables, eval.py nested too deeply, stage records edited into wrong types, and
dataset files that are not what the fine-tune reads. One clear line, exit 2, nothing written;
`summary` always explains."""

from __future__ import annotations

import json
import os

import pytest

from cruijff.pipeline import RunPlan, run_in_process
from cruijff.state import read_record

TINY = "cruijff/tiny-llama-random"
TOUCH = "testing_touch"


def build_args(project, *extra):
    return ["build", "--config-path", project.config, "--task", "toy", "--model", TINY,
            "--dataset", "d.json", "--name", "exp", *extra]


def snapshot(*folders):
    return sorted((str(p), p.stat().st_size) for folder in folders if folder.exists()
                  for p in folder.rglob("*") if p.is_file())


def assert_one_line(result, *expected):
    assert result.code == 2, (result.code, result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in result.err + result.out
    assert "internal error" not in result.err


# --- item 8: task code calling sys.exit ------------------------------------------------------

EXITING_BUILD = '''
import sys

def build(dataset, data_dir):
    sys.exit({code})
'''


@pytest.mark.parametrize("code", ["0", "3", "None", "'bye'"])
def test_a_build_that_calls_sys_exit_is_one_clear_line(cli, project, code):
    project.task("toy").joinpath("data.py").write_text(EXITING_BUILD.format(code=code))
    result = cli(*build_args(project), cwd=project.experiments)
    assert_one_line(result, "task 'toy': build('d.json', ...) called sys.exit(")
    assert list(project.experiments.iterdir()) == []
    assert not (project.root / "data" / "d.json").exists()


def test_a_data_py_that_exits_on_import_is_one_clear_line(cli, project):
    data = project.task("toy").joinpath("data.py")
    data.write_text("import sys\nsys.exit(4)\n\ndef build(dataset, data_dir):\n    pass\n")
    result = cli(*build_args(project), cwd=project.experiments)
    assert_one_line(result, "data.py", "called sys.exit(4)")
    assert list(project.experiments.iterdir()) == []


@pytest.mark.parametrize("ending", ["sys.exit(3)", "raise ValueError('disk says no')"])
def test_a_dataset_half_written_by_a_failing_build_is_not_left_behind(cli, project, ending):
    """Else the next build would take the half file as the dataset."""
    project.task("toy").joinpath("data.py").write_text(
        "import os, sys\n\ndef build(dataset, data_dir):\n"
        "    open(os.path.join(data_dir, dataset), 'w').write('{\"train\": [')\n"
        f"    {ending}\n")
    result = cli(*build_args(project), cwd=project.experiments)
    assert_one_line(result, "task 'toy': build('d.json', ...)")
    assert not (project.root / "data" / "d.json").exists()


# --- item 11a: a root that cannot hold an experiment -----------------------------------------

@pytest.mark.parametrize("root", ["file", "/dev/null", "/proc/self/x", "file/below"])
@pytest.mark.parametrize("command", ["build", "run"])
def test_a_root_that_cannot_hold_an_experiment_is_one_clear_line(cli, project, root, command):
    (project.root / "file").write_text("not a folder\n")
    root = root if root.startswith("/") else str(project.root / root)
    before = snapshot(project.root)
    result = cli(*[command if a == "build" else a for a in build_args(project)],
                 "--root", root, cwd=project.experiments)
    assert_one_line(result, "--root", root)
    assert snapshot(project.root) == before


# --- item 11b: malformed JSON in a CRUIJFF_* variable ----------------------------------------

@pytest.mark.parametrize(("variable", "value"), [
    ("CRUIJFF_RESOURCES", "{bad"), ("CRUIJFF_ORCHESTRATION", "[1"),
    ("CRUIJFF_PIPELINE", "[finetune"),
])
def test_malformed_json_in_an_environment_variable_is_one_clear_line(cli, project, monkeypatch,
                                                                    variable, value):
    monkeypatch.setenv(variable, value)
    before = snapshot(project.root)
    result = cli(*build_args(project), cwd=project.experiments)
    assert_one_line(result, variable, "JSON")
    assert snapshot(project.root) == before


def test_a_malformed_environment_variable_names_itself_in_any_command(cli, built,
                                                                      monkeypatch):
    monkeypatch.setenv("CRUIJFF_RESOURCES", "{bad")
    # reading an experiment does not load the config from the environment: no error there
    assert cli("summary", built).code in (0, 1)
    monkeypatch.delenv("CRUIJFF_RESOURCES")
    monkeypatch.setenv("CRUIJFF_ORCHESTRATION", "[1")
    result = cli("build", "--config-path", built.parent.parent / "config.yaml", "--task", "toy",
                 "--model", TINY, "--dataset", "d.json", "--name", "exp2",
                 cwd=built.parent)
    assert_one_line(result, "CRUIJFF_ORCHESTRATION")


# --- item 11c: eval.py nested too deeply for Python's parser ---------------------------------

@pytest.mark.parametrize("source", [
    "x = " + "(" * 100_000 + ")" * 100_000 + "\n",
    "x = " + "[" * 100_000 + "]" * 100_000 + "\n",
    "x = " + "-" * 200_000 + "1\n",
    "x = " + "1+" * 200_000 + "1\n",
], ids=["parentheses", "brackets", "unary", "binary"])
def test_an_eval_py_nested_too_deeply_is_one_clear_line(cli, project, source):
    project.task("toy").joinpath("eval.py").write_text(source)
    before = snapshot(project.root)
    result = cli(*build_args(project), cwd=project.experiments)
    assert result.code == 2, result.err
    assert_one_line(result, "task 'toy':", "eval.py")
    assert snapshot(project.root) == before


# --- item 12: a stage record edited into valid JSON with wrong types -------------------------

BAD_FIELDS = [("where", 5), ("history", [1]), ("fingerprint", None), ("attempts", "x"),
              ("metrics", []), ("status", "bogus"), ("key", None), ("outputs", "x"),
              ("fingerprint", {"a": "one"}), ("history", ["x"]), ("attempts", 1.5),
              ("extra_field", 1), ("usage", {"wall_s": "long"}),
              ("usage", {"wall_s": 1.0, "peak_rss_mb": 5}), ("outcome", "OOM"),
              ("slurm", {"job_id": "1", "bogus": 1}), ("usage", {"wall_s": 1, "gpus": [1]})]


@pytest.fixture
def touched(cli, project, monkeypatch, tmp_path):
    """A run testing_touch experiment of one trial (no Prefect server reachable)."""
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    config = project.config.read_text().replace("run_control_trials: true",
                                                "run_control_trials: false")
    project.config.write_text(config + f"pipeline: [{TOUCH}]\n")
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--treatments", json.dumps([{f"{TOUCH}.index": 1}]),
                 "--name", "exp", "--root", project.experiments)
    assert result.code == 0, result.err
    exp = project.experiments / "exp"
    assert run_in_process(RunPlan.make(exp)) == {"a": {TOUCH: "done"}}
    return exp


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS,
                         ids=[f"{f}={json.dumps(v)}" for f, v in BAD_FIELDS])
def test_a_record_with_a_wrong_typed_field_is_explained_and_runs_again(cli, touched, field,
                                                                      value):
    path = touched / "trial-a" / ".cruijff" / f"{TOUCH}.json"
    data = json.loads(path.read_text())
    run_id = data["run_id"]
    data[field] = value
    path.write_text(json.dumps(data))
    assert read_record(touched / "trial-a", TOUCH) is None

    result = cli("summary", "--json", touched)
    assert result.code == 1, result.err
    assert "internal error" not in result.err
    stage = json.loads(result.out)["trials"][0]["stages"][TOUCH]
    assert stage["state"] == "pending"
    assert "unreadable" in stage["error"] and "runs it again" in stage["error"], stage
    shown = cli("summary", touched)
    assert shown.code == 1 and "unreadable" in shown.out, shown.err

    assert run_in_process(RunPlan.make(touched)) == {"a": {TOUCH: "done"}}
    again = read_record(touched / "trial-a", TOUCH)
    assert again.status == "done" and again.run_id != run_id
    assert cli("summary", touched).code == 0


def test_a_record_that_is_not_an_object_is_explained(cli, touched):
    path = touched / "trial-a" / ".cruijff" / f"{TOUCH}.json"
    path.write_text("[1, 2]")
    result = cli("summary", "--json", touched)
    assert result.code == 1 and "internal error" not in result.err
    stage = json.loads(result.out)["trials"][0]["stages"][TOUCH]
    assert stage["state"] == "pending" and "unreadable" in stage["error"]


# --- item 13: dataset files the fine-tune cannot read ----------------------------------------

WRITING_BUILD = '''
import os

def build(dataset, data_dir):
    with open(os.path.join(data_dir, dataset), "w") as fh:
        fh.write({text!r})
'''


@pytest.mark.parametrize(("text", "expected"), [
    ("input,output\na,A\n", "not JSON (line 1"),
    ('{"train": [{"input": "a"}]}', "train record 1 has no 'output' string"),
    ('{"train": [{"input": "a", "output": 3}]}', "train record 1 has no 'output' string"),
    ('{"train": [{"input": "a", "output": "A"}, 5]}', "train record 2 is not an object"),
    ('{"train": []}', "'train' list is empty"),
    ('{"test": []}', "no 'train' list"),
    ('{"train": {"input": "a"}}', "'train' is not a list (it is a dict)"),
    ('[{"input": "a", "output": "A"}]', "not a JSON object (it is a list)"),
    ('{"train": [{"input": "a", "output": "A"}], "test": 5}', "'test' is not a list"),
    ("[" * 100_000, "nested too deeply"),
    ('{"train": [{"input": "\xff"', "not JSON (line 1 column 25"),
], ids=["csv", "no-output", "output-not-string", "record-not-object", "empty-train",
        "no-train", "train-not-list", "not-object", "split-not-list", "deep", "truncated"])
def test_a_dataset_the_finetune_cannot_read_is_refused_at_build(cli, project, text, expected):
    project.task("toy").joinpath("data.py").write_text(WRITING_BUILD.format(text=text))
    result = cli(*build_args(project), cwd=project.experiments)
    data_file = project.root / "data" / "d.json"
    assert_one_line(result, f"dataset {data_file}", expected)
    assert list(project.experiments.iterdir()) == []


def test_a_dataset_file_that_is_not_utf8_is_refused(cli, project):
    (project.root / "data").mkdir()
    (project.root / "data" / "d.json").write_bytes(b'{"train": [{"input": "\xff"}]}')
    result = cli(*build_args(project), cwd=project.experiments)
    assert_one_line(result, "not UTF-8")


def test_a_dataset_is_checked_only_by_stages_that_read_it(cli, project):
    """No trial fine-tunes: the eval reads the data through the task's own code, in any
    format its data_ext names, so the build does not judge it."""
    project.task("toy").joinpath("data.py").write_text(
        WRITING_BUILD.format(text="input,output\na,A\n"))
    project.config.write_text(project.config.read_text().replace("use_fine_tune: true",
                                                                 "use_fine_tune: false"))
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.csv", "--name", "exp", cwd=project.experiments)
    assert result.code == 0, result.err


def test_a_large_dataset_is_checked_quickly(cli, project):
    (project.root / "data").mkdir()
    records = [{"id": i, "input": f"w{i}", "output": f"W{i}"} for i in range(200_000)]
    (project.root / "data" / "d.json").write_text(json.dumps({"train": records, "test": []}))
    result = cli(*build_args(project, "--treatment", "finetune.model.lora_rank=4",
                             "--treatment", "finetune.model.lora_rank=8"),
                 cwd=project.experiments)
    assert result.code == 0, result.err
    assert (project.experiments / "exp" / "trial-c").is_dir()


def test_the_fix_is_named(cli, project):
    project.task("toy").joinpath("data.py").write_text(
        WRITING_BUILD.format(text='{"train": [{"input": "a"}]}'))
    result = cli(*build_args(project), cwd=project.experiments)
    assert_one_line(result, "input", "output", "data.py")
    assert os.path.exists(project.root / "data" / "d.json")  # the task's own output: kept
