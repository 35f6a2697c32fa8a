"""Hand-edited experiment files: a stage config (`<stage>.yaml`) whose outputs lead out of the
trial, and the `commands` a trial's config.yaml lists. A run refuses the first before anything
runs or moves (one line naming the file, key and path, exit 2) and never runs the second: it
derives each stage's command from the stage itself."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from cruijff.containment import check_output_paths
from cruijff.errors import CruijffError
from cruijff.pipeline import RunPlan, run_in_process
from cruijff.registry import STAGES
from cruijff.runner import load_experiment
from cruijff.slurm import shown_stage_command, stage_job_command
from cruijff.state import read_record

TOUCH = "testing_touch"


def snapshot(folder: Path) -> list[tuple[str, int]]:
    """Every file under `folder` (links not followed) with its size."""
    return sorted((str(p.relative_to(folder)), p.lstat().st_size) for p in folder.rglob("*"))


def edit_yaml(file: Path, key: str, value: object) -> None:
    """Set a dotted key in a YAML file, as a hand with an editor would."""
    data = yaml.safe_load(file.read_text(encoding="utf-8"))
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


@pytest.fixture
def touch_experiment(cli, project, monkeypatch, tmp_path):
    """Two testing_touch trials (a, b), built by the real CLI; no Prefect server reachable."""
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing may reach it
    config = project.config.read_text().replace("run_control_trials: true",
                                                "run_control_trials: false")
    project.config.write_text(config + f"pipeline: [{TOUCH}]\norchestration: {{retries: 0}}\n")
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model",
                 "cruijff/tiny-llama-random", "--dataset", "d.json", "--treatments",
                 json.dumps([{f"{TOUCH}.index": 1}, {f"{TOUCH}.index": 2}]), "--name", "exp",
                 "--root", project.experiments)
    assert result.code == 0, result.err
    return project.experiments / "exp"


# (a) stage configs edited to write outside the trial

OUTSIDE = "{outside}/written-here"
STAGE_CASES = [
    # (id, stage config file, key, value; {outside} is a folder beside the experiment)
    ("eval-log-dir", "eval.yaml", "log_dir", OUTSIDE),
    ("eval-log-dir-relative", "eval.yaml", "log_dir", "../../outside/written-here"),
    ("eval-log-dir-dotdot", "eval.yaml", "log_dir", "{trial}/logs/../../../outside/x"),
    ("finetune-output-dir", "finetune.yaml", "output_dir", OUTSIDE),
    ("finetune-checkpointer", "finetune.yaml", "checkpointer.output_dir", OUTSIDE),
    ("finetune-metric-logger", "finetune.yaml", "metric_logger.log_dir", OUTSIDE),
    ("finetune-profiler-reference", "finetune.yaml", "profiler.output_dir",
     "${output_dir}/../../../outside/profile"),
]


@pytest.mark.parametrize("force", [False, True], ids=["run", "run-force"])
@pytest.mark.parametrize(("file", "key", "value"), [c[1:] for c in STAGE_CASES],
                         ids=[c[0] for c in STAGE_CASES])
def test_a_stage_config_edited_to_write_outside_is_refused_before_anything_runs(
        cli, built, project, file, key, value, force):
    """Before: Inspect wrote its logs outside, verify crashed, the record stayed `running`;
    `run --force` moved whatever was there into the archive, then crashed."""
    outside = project.experiments / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not cruijff's\n")
    trial = built / "trial-a"
    edit_yaml(trial / file, key,
              value.replace("{outside}", str(outside)).replace("{trial}", str(trial)))
    before_outside, before_exp = snapshot(outside), snapshot(built)
    result = cli("run", *(["--force"] if force else []), built, cwd=project.root)
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert f"trial-a/{file}: {key} is " in lines[0], lines[0]
    assert "outside the trial folder" in lines[0] and "Traceback" not in result.err
    assert snapshot(outside) == before_outside
    assert snapshot(built) == before_exp


UNREADABLE_CASES = [
    # (id, key, value, what the one line must say after the file's name)
    ("reference-to-nothing", "profiler.output_dir", "${oc.env:HOME}/x",
     "key profiler.output_dir is '${oc.env:HOME}/x': cruijff cannot tell where that points"),
    ("model-not-a-mapping", "model", "lora", "is not a finetune config cruijff can run"),
]


@pytest.mark.parametrize(("key", "value", "expected"), [c[1:] for c in UNREADABLE_CASES],
                         ids=[c[0] for c in UNREADABLE_CASES])
def test_a_stage_config_cruijff_cannot_read_is_one_line_not_a_traceback(cli, built, project,
                                                                        key, value, expected):
    edit_yaml(built / "trial-a" / "finetune.yaml", key, value)
    before = snapshot(built)
    result = cli("run", built, cwd=project.root)
    assert result.code == 2, (result.out, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "trial-a/finetune.yaml" in lines[0] and expected in lines[0], lines[0]
    assert snapshot(built) == before


def test_a_run_of_an_edited_stage_config_writes_nothing_and_records_nothing(touch_experiment,
                                                                             tmp_path):
    """The run itself (no orchestrator): refused before a stage starts, in any trial."""
    target = tmp_path / "elsewhere" / "output.txt"
    edit_yaml(touch_experiment / "trial-b" / f"{TOUCH}.yaml", "output", str(target))
    with pytest.raises(CruijffError, match=rf"trial-b/{TOUCH}.yaml: output is .*elsewhere"):
        run_in_process(RunPlan.make(touch_experiment))
    assert not target.parent.exists()
    assert read_record(touch_experiment / "trial-a", TOUCH) is None


def test_a_stage_config_edited_after_the_run_was_planned_is_refused_by_the_stage(
        touch_experiment, tmp_path):
    """The stage checks its config again when it starts (a served flow plans, then runs)."""
    plan = RunPlan.make(touch_experiment, trials="a")
    target = tmp_path / "elsewhere.txt"
    edit_yaml(touch_experiment / "trial-a" / f"{TOUCH}.yaml", "output", str(target))
    with pytest.raises(CruijffError, match=r"output is .*elsewhere\.txt, outside the trial"):
        run_in_process(plan)
    assert not target.exists()
    assert read_record(touch_experiment / "trial-a", TOUCH) is None


def test_prompt_opt_names_its_logs_and_the_eval_config_it_writes(tmp_path):
    """prompt_opt writes its Inspect logs and the chosen prompt into eval.yaml: both count."""
    trial = tmp_path / "exp" / "trial-a"
    trial.mkdir(parents=True)
    stage = STAGES["prompt_opt"]
    config = {"log_dir": str(trial / "logs" / "prompt_opt"),
              "eval_config": str(trial / "eval.yaml")}
    check_output_paths(tmp_path / "exp", trial, stage.config_path(trial),
                       stage.output_paths(trial, config))
    config["eval_config"] = str(tmp_path / "elsewhere.yaml")
    with pytest.raises(CruijffError, match=r"prompt_opt.yaml: eval_config is .*elsewhere.yaml"):
        check_output_paths(tmp_path / "exp", trial, stage.config_path(trial),
                           stage.output_paths(trial, config))


def test_a_shared_fine_tunes_linked_checkpoints_still_count_as_inside(built):
    """What runner.link_shared makes: trial-b/checkpoints -> trial-a/checkpoints."""
    (built / "trial-b" / "checkpoints").rmdir()
    (built / "trial-b" / "checkpoints").symlink_to(built / "trial-a" / "checkpoints")
    plan = RunPlan.make(built)
    assert [stages for _, stages in plan.selection] == [["finetune", "eval"]] * 2


# (b) the commands a trial's config.yaml lists


def test_a_tampered_command_in_a_trial_config_is_never_run(touch_experiment, tmp_path):
    """`commands` in trial-x/config.yaml is documentation: the run derives each command from
    the stage. Before, the run executed whatever the list said."""
    owned = tmp_path / "owned"
    config = touch_experiment / "trial-a" / "config.yaml"
    edit_yaml(config, f"commands.{TOUCH}", ["sh", "-c", f"touch {shlex.quote(str(owned))}"])
    assert run_in_process(RunPlan.make(touch_experiment)) == {"a": {TOUCH: "done"},
                                                              "b": {TOUCH: "done"}}
    assert not owned.exists()
    assert (touch_experiment / "trial-a" / "touch" / "output.txt").read_text() == "a 1\n"


def test_a_trial_config_without_its_commands_still_runs(touch_experiment):
    config = touch_experiment / "trial-b" / "config.yaml"
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    del data["commands"]
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert run_in_process(RunPlan.make(touch_experiment, trials="b")) == {"b": {TOUCH: "done"}}
    assert (touch_experiment / "trial-b" / "touch" / "output.txt").read_text() == "b 2\n"


def test_the_slurm_scripts_run_the_command_a_run_derives(built):
    """One source: every .slurm script runs its stage through `cruijff stage` (which derives
    the command as a run does), and shows the command a run would run."""
    experiment = load_experiment(built)
    for trial in experiment.trials:
        for stage in trial.stages:
            spec = STAGES[stage]
            config = yaml.safe_load(spec.config_path(trial.dir).read_text(encoding="utf-8"))
            script = (trial.dir / f"{stage}.slurm").read_text(encoding="utf-8")
            [line] = [line for line in script.splitlines() if line.startswith("exec ")]
            assert shlex.split(line)[1:] == stage_job_command(trial.dir, stage)
            assert shown_stage_command(script) == spec.command(trial.dir, config, trial.model)
