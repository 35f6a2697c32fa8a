"""Stages from other packages: one file plus its registration (an entry point in the
`cruijff.stages` group, named `package/name`), with no file of cruijff's edited. The package
here is a folder on PYTHONPATH holding the module and a dist-info with its entry points, as
`pip install` would leave it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import cruijff

SHOUT = '''
import sys
from pathlib import Path

from cruijff.stages import Stage, StageConfig, StageFailed, Verified, set_existing

WRITE = "import sys, yaml; c = yaml.safe_load(open(sys.argv[1])); " \\
        "open(c['output'], 'w').write(c['word'].upper())"


class Shout(Stage):
    """Writes its word in capitals."""

    name = "acme/shout"
    backend = "acme-stages"

    def enabled(self, trial):
        return True

    def resolve(self, ctx):
        config = {"word": "hello", "output": str(ctx.trial_dir / "shout.txt")}
        for key, value in self.overrides(ctx.trial).items():
            set_existing(config, key, value, "shout config", self.namespace)
        return StageConfig(config, self.command(ctx.trial_dir, config, ctx.trial.model))

    def command(self, trial_dir, config, model):
        return [sys.executable, "-c", WRITE, str(self.config_path(trial_dir))]

    def verify(self, trial_dir, config):
        text = Path(config["output"]).read_text()
        if text != config["word"].upper():
            raise StageFailed(f"shout.txt holds {text!r}")
        return Verified(["shout.txt"], {"length": len(text)})

    def artifacts(self, trial_dir, config):
        return [Path(config["output"])]
'''


def install(site: Path, entry_points: str) -> dict[str, str]:
    """The plugin package `acme_stages` in `site`, registering `entry_points`."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "acme_stages.py").write_text(SHOUT)
    meta = site / "acme_stages-1.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-stages\nVersion: 1.0\n")
    (meta / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return {"PYTHONPATH": str(site)}


@pytest.mark.slow
def test_a_stage_from_another_package_runs_in_a_pipeline(project, prefect_env, tmp_path):
    env = {**prefect_env, **install(tmp_path / "site", """
        [cruijff.stages]
        acme/shout = acme_stages:Shout
    """)}
    project.config.write_text(project.config.read_text() + "pipeline: [acme/shout]\n")
    built = cruijff("build", "--config-path", project.config, "--task", "toy", "--model",
                    "cruijff/tiny-llama-random", "--dataset", "d.json", "--treatment",
                    "acme/shout.word=ahoy", "--name", "plug", "--root", project.experiments,
                    env=env)
    assert built.returncode == 0, built.stderr
    exp = project.experiments / "plug"
    assert (exp / "trial-b" / "acme__shout.yaml").is_file()
    assert (exp / "trial-b" / "acme__shout.slurm").is_file()
    run = cruijff("run", "-q", "--json", exp, env=env)
    assert run.returncode == 0, run.stderr
    assert [t["stages"] for t in json.loads(run.stdout)["trials"]] == [
        {"acme/shout": "done"}, {"acme/shout": "done"}]
    assert (exp / "trial-a" / "shout.txt").read_text() == "HELLO"
    assert (exp / "trial-b" / "shout.txt").read_text() == "AHOY"
    summary = json.loads(cruijff("summary", "--json", exp, env=env).stdout)
    assert summary["complete"] is True


def test_a_broken_or_clashing_plugin_is_a_warning_not_a_failure(project, tmp_path, cli,
                                                                monkeypatch):
    """A plugin that cannot import breaks only a pipeline that names it; one that claims a
    built-in's name is refused with a warning, and the built-in stays."""
    for key, value in install(tmp_path / "site", """
        [cruijff.stages]
        eval = acme_stages:Shout
        acme/broken = acme_missing:Nope
    """).items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    from cruijff.registry import STAGES

    monkeypatch.setattr(STAGES, "_plugins", None)  # read the entry points again
    args = ("build", "--config-path", project.config, "--task", "toy", "--model",
            "cruijff/tiny-llama-random", "--dataset", "d.json", "--root", project.experiments,
            "--dry-run")
    fine = cli(*args, "--name", "fine")
    assert fine.code == 0, fine.err
    assert fine.err.startswith("warning: stage plugin 'eval' (acme_stages:Shout) is refused: "
                               "cruijff has a built-in stage of that name")
    assert type(STAGES["eval"]).__name__ == "EvalStage"
    project.config.write_text(project.config.read_text() + "pipeline: [acme/broken]\n")
    broken = cli(*args, "--name", "broken")
    assert broken.code == 2
    assert broken.err.startswith("error: pipeline: stage 'acme/broken' (acme_missing:Nope) "
                                 "failed to load: ModuleNotFoundError")


SNEAKY = '''
import sys

from cruijff.stages import Stage, StageConfig


class Sneaky(Stage):
    """Gives resolve() a command of its own but leaves command() at the default."""

    name = "acme/sneaky"
    backend = "acme-stages"

    def enabled(self, trial):
        return True

    def resolve(self, ctx):
        return StageConfig({"x": 1}, [sys.executable, "-c", "print('hi')"])

    def verify(self, trial_dir, config):
        raise NotImplementedError

    def artifacts(self, trial_dir, config):
        return []
'''


def test_a_stage_whose_resolve_gives_another_command_than_command_is_refused(
        project, tmp_path, cli, monkeypatch):
    """A run derives each stage's command again from command(): resolve() must agree, or the
    .slurm scripts would run one command and `cruijff run` another."""
    for key, value in install(tmp_path / "site", """
        [cruijff.stages]
        acme/sneaky = acme_sneaky:Sneaky
    """).items():
        monkeypatch.setenv(key, value)
    (tmp_path / "site" / "acme_sneaky.py").write_text(SNEAKY)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    from cruijff.registry import STAGES

    monkeypatch.setattr(STAGES, "_plugins", None)  # read the entry points again
    project.config.write_text(project.config.read_text() + "pipeline: [acme/sneaky]\n")
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model",
                 "cruijff/tiny-llama-random", "--dataset", "d.json", "--root",
                 project.experiments, "--name", "sneaky")
    assert result.code == 2, (result.out, result.err)
    assert result.err.startswith("error: stage acme/sneaky: resolve() gives the command ")
    assert "must come from its command()" in result.err
    assert not (project.experiments / "sneaky").exists()
