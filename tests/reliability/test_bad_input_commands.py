"""Bad input to run, summary, progress and analyze: exit 2, one clear line, nothing written."""

from __future__ import annotations

import pytest

TINY = "cruijff/tiny-llama-random"


@pytest.fixture
def built(cli, project, monkeypatch, tmp_path):
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing may start
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--treatment", "finetune.model.lora_rank=4",
                 "--name", "exp", cwd=project.experiments)
    assert result.code == 0, result.err
    return project.experiments / "exp"


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")
                  if p.is_file())


CASES = [
    ("run-unknown-trial", ["run", "--trials", "a,zz", "{exp}"], "unknown trial 'zz'"),
    ("run-ten-thousand-trials", ["run", "--trials", ",".join(f"x{i}" for i in range(10_000)),
                                 "{exp}"], "(and 9999 more)"),
    ("run-empty-trials", ["run", "--trials", ",", "{exp}"], "--trials is empty"),
    ("run-unknown-stage", ["run", "--stage", "train", "{exp}"], "unknown stage 'train'"),
    ("run-unknown-executor", ["run", "--executor", "k8s", "{exp}"], "local or slurm"),
    ("run-not-an-experiment", ["run", "{root}"], "not an experiment config written by"),
    ("run-missing-folder", ["run", "{root}/nope"], "is not a cruijff experiment"),
    ("run-both-forms", ["run", "--config-path", "{config}", "--task", "toy", "{exp}"],
     "not both"),
    ("run-failed-and-trials", ["run", "--failed", "--trials", "a", "{exp}"], "drop --trials"),
    ("summary-unknown-trial", ["summary", "--trials", "q", "{exp}"], "unknown trial 'q'"),
    ("summary-unknown-stage", ["summary", "--stage", "x", "{exp}"], "unknown stage 'x'"),
    ("summary-a-file", ["summary", "{config}"], "is not a cruijff experiment"),
    ("progress-missing", ["progress", "{root}/nope"], "is not a cruijff experiment"),
    ("analyze-nothing-ran", ["analyze", "{exp}"], "has no results yet"),
    ("analyze-bad-format", ["analyze", "--format", "pdf", "{exp}"], "pdf"),
    ("schedule-neither", ["schedule-reruns", "{exp}"], "--cron"),
    ("exec-unknown-stage", ["exec", "train", "{config}"], "unknown stage 'train'"),
    ("model-get-traversal", ["model", "get", "../../etc", "--model-dir", "{root}"],
     "not a Hugging Face id"),
]


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_to_commands_is_one_line_and_exit_2(cli, built, project, args, expected):
    before = snapshot(project.root)
    fill = {"exp": str(built), "root": str(project.root), "config": str(project.config)}
    result = cli(*[a.format(**fill) for a in args], cwd=project.root)
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert expected in lines[0]
    assert "Traceback" not in result.out + result.err
    assert snapshot(project.root) == before
