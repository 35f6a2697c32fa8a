"""Any torchtune metric logger works: cruijff reads a fine-tune's losses from its own capture
file (cruijff/metric_capture.py), written beside whatever logger the config picks, so a run
that logs to stdout (or W&B, TensorBoard, MLflow) is verified on its first attempt instead
of failing with "logged no training loss" and running again."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EXAMPLE, make_site
from omegaconf import OmegaConf

from cruijff.components import check_components
from cruijff.metric_capture import CAPTURE_FILE, CAPTURE_KEY, CapturingLogger, install
from cruijff.slurm import shown_stage_command
from cruijff.stages.finetune import (
    TORCHTUNE_LOGGERS,
    FinetuneStage,
    _signature_keywords,
    metric_lines,
)

LOGGERS = "torchtune.training.metric_logging"
STDOUT = f"{LOGGERS}.StdoutLogger"
REPO = Path(__file__).resolve().parent.parent
FULL_TEMPLATE = REPO / "cruijff" / "configs" / "tiny_llama_full.yaml"
STEPS = 3


class Recording:
    """A metric logger that remembers what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.project = "mine"

    def log(self, name: str, data: Any, step: int) -> None:
        self.calls.append(("log", name, data, step))

    def log_dict(self, payload: dict[str, Any], step: int) -> None:
        self.calls.append(("log_dict", dict(payload), step))

    def log_config(self, config: Any) -> None:
        self.calls.append(("log_config", config))

    def close(self) -> None:
        self.calls.append(("close",))


def test_the_capture_writes_each_step_and_hands_every_call_on(tmp_path):
    import torch

    inner = Recording()
    path = tmp_path / "logs" / CAPTURE_FILE
    logger = CapturingLogger(inner, path)
    logger.log_config({"a": 1})
    logger.log_dict({"loss": torch.tensor(2.5), "lr": 0.01, "tokens_per_second_per_gpu": 40.0,
                     "note": "text"}, step=1)
    logger.log("loss", 1.5, step=2)
    assert path.read_text() == (  # flushed per line: readable while the run goes on
        "Step 1 | loss:2.5 lr:0.01 tokens_per_second_per_gpu:40.0\nStep 2 | loss:1.5\n")
    assert logger.project == "mine"  # what else the user's logger has, it still has
    logger.close()
    assert [c[0] for c in inner.calls] == ["log_config", "log_dict", "log", "close"]
    assert inner.calls[1][1]["note"] == "text"


def test_install_wraps_only_the_metric_logger_of_a_config_that_names_a_capture_file(tmp_path):
    from torchtune import config

    install()
    install()  # idempotent: one wrapper, not two
    cfg = OmegaConf.create({
        "metric_logger": {"_component_": STDOUT},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        CAPTURE_KEY: str(tmp_path / CAPTURE_FILE)})
    logger = config.instantiate(cfg.metric_logger)
    assert isinstance(logger, CapturingLogger) and type(logger._logger).__name__ == "StdoutLogger"
    assert not isinstance(config.instantiate(cfg.loss), CapturingLogger)
    del cfg[CAPTURE_KEY]  # a config built before the capture existed: the logger as it is
    assert type(config.instantiate(cfg.metric_logger)).__name__ == "StdoutLogger"


def _trial(tmp_path: Path, capture: bool) -> tuple[Path, dict[str, Any]]:
    trial = tmp_path / "trial-a"
    (trial / "logs" / "finetune").mkdir(parents=True)
    config: dict[str, Any] = {"metric_logger": {"_component_": f"{LOGGERS}.DiskLogger",
                                                "log_dir": str(trial / "logs" / "finetune")}}
    if capture:
        config[CAPTURE_KEY] = str(trial / "logs" / "finetune" / CAPTURE_FILE)
    return trial, config


def test_losses_come_from_the_capture_file_and_else_from_disklogger_as_before(tmp_path):
    trial, config = _trial(tmp_path, capture=True)
    disk = trial / "logs" / "finetune" / "log_1.txt"
    disk.write_text("Step 1 | loss:9.0\nStep 2 | loss:8.0\n")
    assert FinetuneStage().losses(trial, config) == [9.0, 8.0]  # no capture written: Disk
    (trial / "logs" / "finetune" / CAPTURE_FILE).write_text("Step 1 | loss:3.0\n")
    assert FinetuneStage().losses(trial, config) == [3.0]
    assert metric_lines(trial, config)[1] == trial / "logs" / "finetune" / CAPTURE_FILE
    old_trial, old_config = _trial(tmp_path / "old", capture=False)  # a record made before
    (old_trial / "logs" / "finetune" / "log_1.txt").write_text("Step 1 | loss:7.0\n")
    assert FinetuneStage().losses(old_trial, old_config) == [7.0]


def test_torchtunes_metric_loggers_pass_the_component_allow_list():
    for name in ("DiskLogger", "StdoutLogger", "WandBLogger", "TensorBoardLogger",
                 "MLFlowLogger", "CometLogger"):
        check_components({"metric_logger": {"_component_": f"{LOGGERS}.{name}"}}, "finetune")


def _build(cli, project, *treatments: str, name: str = "exp") -> Path:
    args = [a for t in treatments for a in ("--treatment", t)]
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model",
                 "cruijff/tiny-llama-random", "--dataset", "d.json", *args, "--name", name,
                 cwd=project.experiments)
    assert result.code == 0, result.err
    return project.experiments / name


@pytest.mark.parametrize("component", sorted(TORCHTUNE_LOGGERS))
def test_the_table_of_torchtunes_loggers_matches_the_installed_torchtune(component):
    """The build reads torchtune's loggers' keywords from a table (no torch import); it must
    say what the installed classes' signatures say."""
    assert TORCHTUNE_LOGGERS[component] == _signature_keywords(component)


@pytest.mark.parametrize(("logger", "log_dir"), [
    ("MLFlowLogger", False),  # takes no log_dir: torchtune would fail on one
    ("StdoutLogger", True),
    ("WandBLogger", True),
    ("TensorBoardLogger", True),
])
def test_the_build_gives_the_log_folder_only_to_a_logger_that_takes_one(cli, project, logger,
                                                                        log_dir):
    exp = _build(cli, project, f"finetune.metric_logger._component_={LOGGERS}.{logger}")
    trial = exp / "trial-b"
    config = yaml.safe_load((trial / "finetune.yaml").read_text())
    assert config["metric_logger"]["_component_"] == f"{LOGGERS}.{logger}"
    assert ("log_dir" in config["metric_logger"]) == log_dir
    assert config[CAPTURE_KEY] == str(trial / "logs" / "finetune" / CAPTURE_FILE)


def test_a_design_cannot_move_the_capture_file(cli, project):
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model",
                 "cruijff/tiny-llama-random", "--dataset", "d.json", "--treatment",
                 f"finetune.{CAPTURE_KEY}=/tmp/elsewhere.txt", cwd=project.experiments)
    assert result.code == 2 and f"has no '{CAPTURE_KEY}'" in result.err


def test_an_edited_capture_path_outside_the_trial_is_refused(cli, project):
    from cruijff.errors import CruijffError
    from cruijff.runner import load_experiment, stage_command

    exp = _build(cli, project, "finetune.model.lora_rank=4")
    path = exp / "trial-b" / "finetune.yaml"
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, CAPTURE_KEY: str(project.root / "x.txt")}))
    with pytest.raises(CruijffError, match=CAPTURE_KEY):
        stage_command(load_experiment(exp).trials[1], "finetune")


def test_a_non_lora_recipe_runs_through_cruijffs_launcher(cli, project, tmp_path):
    """`python -m cruijff.recipes.run <recipe>`: torchtune's own recipe, named in the command,
    with the capture installed: what a researcher can sbatch by hand."""
    config = yaml.safe_load(FULL_TEMPLATE.read_text())
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    project.config.write_text(f"{project.config.read_text()}finetune_config: "
                              f"{tmp_path / 'full.yaml'}\n")
    exp = _build(cli, project, "finetune.epochs=2")
    assert _slurm_stage_command(exp / "trial-b")[1:] == [
        "-m", "cruijff.recipes.run", "full_finetune_single_device",
        "--config", str(exp / "trial-b" / "finetune.yaml")]


def _slurm_stage_command(trial: Path) -> list[str]:
    """The fine-tune's own command as its .slurm script shows it (the script runs it through
    `cruijff stage`)."""
    return shown_stage_command((trial / "finetune.slurm").read_text())


# ---- real fine-tunes of the tiny model -----------------------------------------------------

def _run_finetunes(cli, tmp_path, monkeypatch, model: Path, config: str,
                   treatment: str) -> Path:
    """Build a one-trial experiment (the treatment only) on the example task and run its
    fine-tune in this process, no orchestrator; the trial folder."""
    from cruijff.pipeline import RunPlan, run_in_process

    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing may reach it
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    (tmp_path / "site").mkdir()
    site = make_site(tmp_path / "site", model, f"run_control_trials: false\n{config}")
    result = cli("build", "--config-path", site / "config.yaml", "--root", site,
                 "--name", "loggers", "--task", "capitalization",
                 "--dataset", "words_5L_80_1000.json", "--model", "cruijff/tiny-llama-random",
                 "--control", "torchtune.epochs=1",
                 "--control", f"torchtune.max_steps_per_epoch={STEPS}",
                 "--control", "torchtune.lr_scheduler.num_warmup_steps=0",
                 "--treatment", treatment)
    assert result.code == 0, result.err
    exp = site / "loggers"
    outcomes = run_in_process(RunPlan.make(exp, stage="finetune", workers=1))
    assert outcomes == {"a": {"finetune": "done"}}
    return exp / "trial-a"


def _assert_done_first_time_from_the_capture(trial: Path) -> None:
    record = json.loads((trial / ".cruijff" / "finetune.json").read_text())
    assert record["status"] == "done" and record["attempts"] == 1
    assert record["metrics"]["steps"] == STEPS
    captured = (trial / "logs" / "finetune" / CAPTURE_FILE).read_text().splitlines()
    assert [line.split(" |")[0] for line in captured] == [f"Step {n}" for n in
                                                          range(1, STEPS + 1)]
    assert not list((trial / "logs" / "finetune").glob("log_*.txt"))  # no DiskLogger here
    stage_log = (trial / record["log"]).read_text()  # StdoutLogger's own lines are there
    assert len(re.findall(r"Step \d+ \| loss:", stage_log)) == STEPS  # (after tqdm's bar)


@pytest.mark.slow
def test_a_lora_fine_tune_logging_to_stdout_is_done_on_its_first_attempt(
        cli, tmp_path, monkeypatch, tiny_random_model):
    trial = _run_finetunes(cli, tmp_path, monkeypatch, tiny_random_model, "",
                           f"finetune.metric_logger._component_={STDOUT}")
    _assert_done_first_time_from_the_capture(trial)


@pytest.mark.slow
def test_a_full_fine_tune_through_the_launcher_logging_to_stdout_is_done(
        cli, tmp_path, monkeypatch, tiny_random_model):
    """torchtune's full_finetune_single_device, the user's config choosing StdoutLogger."""
    config = yaml.safe_load(FULL_TEMPLATE.read_text())
    config["metric_logger"] = {"_component_": STDOUT}
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    trial = _run_finetunes(cli, tmp_path, monkeypatch, tiny_random_model,
                           f"finetune_config: {tmp_path / 'full.yaml'}\n",
                           "finetune.batch_size=8")
    assert "cruijff.recipes.run" in (trial / "finetune.slurm").read_text()
    _assert_done_first_time_from_the_capture(trial)


@pytest.mark.slow
def test_a_distributed_fine_tune_under_torchrun_logging_to_stdout_is_done(
        cli, tmp_path, monkeypatch, family_models):
    """The 70B row's recipe (lora_finetune_distributed) on two CPU processes, as
    tests/test_distributed_finetune.py runs it, its config choosing StdoutLogger: rank 0
    writes the capture, once per step."""
    import shutil

    from test_distributed_finetune import BIG, CPU_SHIM, PROFILE, tiny_distributed_config

    from cruijff.pipeline import RunPlan, run_in_process

    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("PYTHONPATH", str(CPU_SHIM))
    (tmp_path / "models").mkdir()
    shutil.copytree(family_models["cruijff/tiny-llama3"], tmp_path / "models" / PROFILE)
    path = tiny_distributed_config(tmp_path / "tiny_70B_lora.yaml")
    config = yaml.safe_load(path.read_text())
    config["metric_logger"] = {"_component_": STDOUT}
    config["max_steps_per_epoch"] = STEPS
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "config.yaml").write_text(
        f"model_dir: models\ntasks_dir: {EXAMPLE / 'tasks'}\ndata_dir: data\n"
        f"finetune_config: {path}\nrun_control_trials: true\n"
        f"resources:\n  {PROFILE}: {{gres: 2}}\n")
    result = cli("build", "--config-path", tmp_path / "config.yaml", "--root", tmp_path,
                 "--name", "big", "--task", "capitalization", "--model", BIG,
                 "--dataset", "words_5L_80_100.json")
    assert result.code == 0, result.err
    trial = tmp_path / "big" / "trial-a"
    command = _slurm_stage_command(trial)
    assert Path(command[0]).name == "torchrun"
    assert command[1:] == ["--standalone", "--nproc_per_node", "2", "-m", "cruijff.recipes.run",
                           "lora_finetune_distributed", "--config", str(trial / "finetune.yaml")]
    outcomes = run_in_process(RunPlan.make(tmp_path / "big", stage="finetune", workers=1))
    assert outcomes == {"a": {"finetune": "done"}}
    _assert_done_first_time_from_the_capture(trial)
