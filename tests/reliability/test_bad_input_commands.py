"""Bad input to run, summary, progress and analyze: exit 2, one clear line, nothing written."""

from __future__ import annotations

import pytest

TINY = "cruijff/tiny-llama-random"


DEEP = "[" * 100_000
ELEVEN_MB = 11 * 1024 * 1024


def append(relative: str, extra: str | bytes):
    """Add text (or bytes) at the end of one of the built experiment's files."""
    def setup(experiment):
        path = experiment / relative
        data = extra.encode() if isinstance(extra, str) else extra
        path.write_bytes(path.read_bytes() + data)
    return setup


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")
                  if p.is_file())


CASES = [
    ("run-unknown-trial", None, ["run", "--trials", "a,zz", "{exp}"], "unknown trial 'zz'"),
    ("run-ten-thousand-trials", None,
     ["run", "--trials", ",".join(f"x{i}" for i in range(10_000)), "{exp}"], "(and 9999 more)"),
    ("run-empty-trials", None, ["run", "--trials", ",", "{exp}"], "--trials is empty"),
    ("run-unknown-stage", None, ["run", "--stage", "train", "{exp}"], "unknown stage 'train'"),
    ("run-unknown-executor", None, ["run", "--executor", "k8s", "{exp}"], "local or slurm"),
    ("run-not-an-experiment", None, ["run", "{root}"], "not an experiment config written by"),
    ("run-missing-folder", None, ["run", "{root}/nope"], "is not a cruijff experiment"),
    ("run-both-forms", None, ["run", "--config-path", "{config}", "--task", "toy", "{exp}"],
     "not both"),
    ("run-failed-and-trials", None, ["run", "--failed", "--trials", "a", "{exp}"],
     "drop --trials"),
    ("summary-unknown-trial", None, ["summary", "--trials", "q", "{exp}"], "unknown trial 'q'"),
    ("summary-unknown-stage", None, ["summary", "--stage", "x", "{exp}"], "unknown stage 'x'"),
    ("summary-a-file", None, ["summary", "{config}"], "is not a cruijff experiment"),
    ("progress-missing", None, ["progress", "{root}/nope"], "is not a cruijff experiment"),
    ("analyze-nothing-ran", None, ["analyze", "{exp}"], "has no results yet"),
    ("analyze-bad-format", None, ["analyze", "--format", "pdf", "{exp}"], "pdf"),
    ("schedule-neither", None, ["schedule-reruns", "{exp}"], "--cron"),
    ("exec-unknown-stage", None, ["exec", "train", "{config}"], "unknown stage 'train'"),
    ("model-get-traversal", None, ["model", "get", "../../etc", "--model-dir", "{root}"],
     "not a Hugging Face id"),
    # the experiment's own files edited into hostile ones: read safely, refused in one line
    ("run-config-python-tag",
     append("config.yaml", "x: !!python/object/apply:os.system ['touch CANARY']\n"),
     ["run", "{exp}"], "invalid YAML"),
    ("summary-config-deep", append("config.yaml", "x: " + DEEP + "\n"), ["summary", "{exp}"],
     "nested more than 100 levels deep"),
    ("progress-config-not-utf8", append("config.yaml", b"x: \xff\n"), ["progress", "{exp}"],
     "not UTF-8"),
    ("analyze-config-billion-laughs",
     append("config.yaml", "l0: &l0 [x, x]\nl1: &l1 [*l0, *l0]\nl2: [*l1, *l1]\n"),
     ["analyze", "{exp}"], "aliases"),
    ("run-trial-config-huge", append("trial-a/config.yaml", "# " + "x" * ELEVEN_MB + "\n"),
     ["run", "{exp}"], "the limit is 10485760"),
    ("exec-stage-config-deep", append("trial-a/eval.yaml", "x: " + DEEP + "\n"),
     ["exec", "eval", "{exp}/trial-a/eval.yaml"], "nested more than 100 levels deep"),
    # hostile arguments
    ("summary-ten-thousand-trials", None,
     ["summary", "--trials", ",".join(f"x{i}" for i in range(10_000)), "{exp}"],
     "(and 9999 more)"),
    ("run-stage-traversal", None, ["run", "--stage", "../eval", "{exp}"],
     "unknown stage '../eval'"),
    ("run-build-dataset-absolute", None,
     ["run", "--config-path", "{config}", "--task", "toy", "--model", TINY, "--dataset",
      "/etc/passwd", "--name", "exp2"], "dataset '/etc/passwd' must be a plain file name"),
    ("run-build-deep-treatments", None,
     ["run", "--config-path", "{config}", "--task", "toy", "--model", TINY, "--dataset",
      "d.json", "--treatments", DEEP, "--name", "exp2"], "nested more than 100 levels deep"),
    ("run-build-model-injection", None,
     ["run", "--config-path", "{config}", "--task", "toy", "--model", "org/x;touch CANARY",
      "--dataset", "d.json", "--name", "exp2"], "not a Hugging Face id"),
    ("model-get-absolute", None, ["model", "get", "/etc/passwd", "--model-dir", "{root}"],
     "not a Hugging Face id"),
]


@pytest.mark.parametrize(("setup", "args", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_to_commands_is_one_line_and_exit_2(cli, built, project, setup, args,
                                                      expected):
    if setup:
        setup(built)
    before = snapshot(project.root)
    fill = {"exp": str(built), "root": str(project.root), "config": str(project.config)}
    result = cli(*[a.format(**fill) for a in args], cwd=project.root)
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert expected in lines[0]
    assert "Traceback" not in result.out + result.err
    assert snapshot(project.root) == before


def test_at_least_thirty_cases():
    assert len(CASES) >= 30
