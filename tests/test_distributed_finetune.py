"""The 70B row: torchtune's distributed LoRA recipe under torchrun, one process per GPU the
trial's resources request, derived again from the stage config when it runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLE, cruijff

from cruijff.errors import CruijffError
from cruijff.models import torchtune_config_path
from cruijff.runner import load_experiment, stage_command
from cruijff.settings import ResourceProfile
from cruijff.slurm import shown_stage_command
from cruijff.stages.finetune import PROCESSES, process_count

BIG = "meta-llama/Llama-3.3-70B-Instruct"
PROFILE = BIG.replace("/", "__")
RECIPE = "lora_finetune_distributed"
CPU_SHIM = Path(__file__).parent / "cpu_distributed"


def with_big_model(project, family_models, resources: str) -> None:
    """The family-shaped tiny Llama 3 stands in for the 70B weights, with its own profile."""
    shutil.copytree(family_models["cruijff/tiny-llama3"], project.root / "models" / PROFILE)
    project.config.write_text(f"{project.config.read_text()}  {PROFILE}: {resources}\n")


def build(cli, project, name: str = "big"):
    return cli("build", "--config-path", project.config, "--task", "toy", "--model", BIG,
               "--dataset", "d.json", "--name", name, cwd=project.experiments)


def launched(script: Path) -> list[str]:
    """The stage command a .slurm script runs (through `cruijff stage`), as it shows it."""
    return shown_stage_command(script.read_text())


@pytest.mark.parametrize(("resources", "gpus"), [
    ("{gres: 2}", 2),
    ("{gres: 'gpu:a100:4', mem: 64}", 4),
    ("{gpus_per_node: 'h100:8'}", 8),
])
def test_the_command_starts_one_process_per_requested_gpu(cli, project, family_models,
                                                          resources, gpus):
    with_big_model(project, family_models, resources)
    result = build(cli, project)
    assert result.code == 0, result.err
    trial = project.experiments / "big" / "trial-a"
    command = launched(trial / "finetune.slurm")
    assert command[1:7] == ["--standalone", "--nproc_per_node", str(gpus), "-m",
                            "cruijff.recipes.run", RECIPE]
    assert command[7:] == ["--config", str(trial / "finetune.yaml")]
    assert yaml.safe_load((trial / "finetune.yaml").read_text())[PROCESSES] == gpus
    experiment = load_experiment(project.experiments / "big")
    assert stage_command(experiment.trials[0], "finetune") == command


def test_a_run_derives_the_process_count_from_the_stage_config(cli, project, family_models):
    """What runs comes from finetune.yaml as it is on disk, never from the .slurm script or
    the trial config; a config without a count is refused, naming the file and the fix."""
    with_big_model(project, family_models, "{gres: 8}")
    assert build(cli, project).code == 0
    path = project.experiments / "big" / "trial-a" / "finetune.yaml"
    trial = load_experiment(project.experiments / "big").trials[0]
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, PROCESSES: 4}))
    assert stage_command(trial, "finetune")[2:4] == ["--nproc_per_node", "4"]
    del config[PROCESSES]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(CruijffError, match=f"{path}: fine-tune config key {PROCESSES} is "
                                           r"None: .* \(cruijff build --force\)"):
        stage_command(trial, "finetune")


def test_a_distributed_fine_tune_without_gpus_is_refused_at_build(cli, project,
                                                                  family_models):
    """No one-process fallback: the 70B config fits no single device (see process_count)."""
    with_big_model(project, family_models, "{mem: 64}")
    result = build(cli, project)
    assert result.code == 2
    assert result.err.strip() == (
        f"error: model {BIG} fine-tunes with torchtune's {RECIPE} recipe, one process per "
        f"GPU, but resources.{PROFILE} requests no GPU: set resources.{PROFILE}.gres to the "
        "GPUs to train on")
    assert not (project.experiments / "big").exists()


def test_a_design_cannot_set_the_process_count(cli, project, family_models):
    with_big_model(project, family_models, "{gres: 8}")
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", BIG,
                 "--dataset", "d.json", "--control", f"finetune.{PROCESSES}=2",
                 cwd=project.experiments)
    assert result.code == 2 and f"has no '{PROCESSES}'" in result.err


@pytest.mark.parametrize(("resources", "gpus"), [
    ({"gres": 4}, 4),
    ({"gres": "4"}, 4),
    ({"gres": "gpu"}, 1),
    ({"gres": "gpu:2"}, 2),
    ({"gres": "gpu:a100:8", "gpus_per_node": "a100:8"}, 8),
    ({"gpus": "a100:2,v100:2"}, 4),
    ({"gpus_per_task": 2, "ntasks_per_node": 4}, 8),
    ({"gpus_per_task": "a100:1"}, 1),
])
def test_gpus_per_node_from_each_way_slurm_asks_for_them(resources, gpus):
    assert process_count(ResourceProfile(**resources), PROFILE, BIG, RECIPE) == gpus


@pytest.mark.parametrize(("resources", "message"), [
    ({"gres": "mps:100"}, "requests no GPU"),
    ({"gres": 8, "gpus": 4}, r"asks for different GPU counts \(gres 8, gpus 4\): keep one"),
    ({"gres": 8, "nodes": 2}, "nodes is 2: .* runs its processes on one node here"),
    ({"gpus": "a100"}, "gpus is 'a100': cruijff cannot tell how many GPUs"),
    ({"gpus_per_task": 1, "ntasks": "x"}, "ntasks is 'x': give a count"),
])
def test_gpu_requests_cruijff_cannot_run_on_are_refused(resources, message):
    with pytest.raises(CruijffError, match=message):
        process_count(ResourceProfile(**resources), PROFILE, BIG, RECIPE)


def tiny_distributed_config(path: Path) -> Path:
    """torchtune's 70B LoRA config as it is, but for the family-shaped tiny Llama 3 on CPU
    (the shapes cruijff/models.py gives cruijff/tiny-llama3), a few steps."""
    config = yaml.safe_load(torchtune_config_path("llama3_3/70B_lora").read_text())
    config["model"].update({
        "_component_": "torchtune.models.llama3_2.lora_llama3_2", "vocab_size": 128256,
        "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64,
        "intermediate_dim": 128, "max_seq_len": 131072, "rope_base": 500000,
        "scale_factor": 32, "tie_word_embeddings": True})
    config.update({"device": "cpu", "dtype": "fp32", "seed": 0, "batch_size": 2,
                   "max_steps_per_epoch": 2})
    config["lr_scheduler"]["num_warmup_steps"] = 0
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_a_distributed_fine_tune_runs_two_processes_on_cpu_with_cuda_calls_shimmed(
        family_models, tmp_path, prefect_env):
    """build -> run (local executor) of the 70B row's command, `tune run --nproc_per_node 2
    lora_finetune_distributed`, on two CPU processes over gloo: torchtune 0.6.1's recipe needs
    three CUDA-only calls replaced for that (tests/cpu_distributed/sitecustomize.py)."""
    (tmp_path / "models").mkdir()
    shutil.copytree(family_models["cruijff/tiny-llama3"], tmp_path / "models" / PROFILE)
    tiny_distributed_config(tmp_path / "tiny_70B_lora.yaml")
    (tmp_path / "config.yaml").write_text(
        f"model_dir: models\ntasks_dir: {EXAMPLE / 'tasks'}\ndata_dir: data\n"
        "finetune_config: tiny_70B_lora.yaml\n"
        f"resources:\n  {PROFILE}: {{gres: 2}}\n")
    env = {**prefect_env, "PYTHONPATH": str(CPU_SHIM)}
    result = cruijff("run", "--config-path", tmp_path / "config.yaml", "--root", tmp_path,
                     "--name", "big", "--task", "capitalization", "--model", BIG,
                     "--dataset", "words_5L_80_100.json", "--stage", "finetune", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    trial = tmp_path / "big" / "trial-a"
    assert launched(trial / "finetune.slurm")[1:7] == ["--standalone", "--nproc_per_node", "2",
                                                       "-m", "cruijff.recipes.run", RECIPE]
    final = trial / "checkpoints" / "final"
    assert (final / "adapter_model.pt").is_file()  # the config saves the adapter only
    record = json.loads((trial / ".cruijff" / "finetune.json").read_text())
    assert record["status"] == "done" and record["metrics"]["steps"] == 2
    assert record["usage"]["max_processes"] >= 3  # torchrun and its two training processes
