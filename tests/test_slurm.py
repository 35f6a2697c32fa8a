"""Generated batch scripts: pinned by golden files, and safe whatever the config says."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import pytest

from cruijff.errors import CruijffError
from cruijff.settings import ResourceProfile
from cruijff.slurm import render_script, sbatch_options

GOLDEN = Path(__file__).parent / "golden"
TINY = "cruijff/tiny-llama-random"


def normalized(text: str, root: Path) -> str:
    """Paths that differ per machine become placeholders."""
    return (text.replace(str(Path(sys.executable).parent), "<BIN>")
            .replace(sys.executable, "<BIN>/python")
            .replace(str(root), "<ROOT>"))


@pytest.mark.parametrize("stage", ["finetune", "eval"])
def test_generated_scripts_match_golden_files(cli, project, stage):
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--treatment", "torchtune.model.lora_rank=4",
                 "--name", "golden", cwd=project.experiments)
    assert result.code == 0, result.err
    script = project.experiments / "golden" / "trial-b" / f"{stage}.slurm"
    actual = normalized(script.read_text(), project.root)
    expected = (GOLDEN / f"{stage}.slurm").read_text()
    assert actual == expected


def test_a_distributed_finetune_script_matches_its_golden_file(cli, project, family_models):
    """The 70B row: one task, the GPUs its profile asks for, and torchrun inside that task
    starting one recipe process per GPU (a stand-in folder: the family-shaped tiny Llama 3)."""
    model = "meta-llama/Llama-3.3-70B-Instruct"
    profile = model.replace("/", "__")
    shutil.copytree(family_models["cruijff/tiny-llama3"], project.root / "models" / profile)
    project.config.write_text(f"{project.config.read_text()}  {profile}:\n"
                              "    time: '2-00:00:00'\n    cpus_per_task: 32\n"
                              "    mem: 512\n    gres: 8\n")
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", model,
                 "--dataset", "d.json", "--treatment", "torchtune.model.lora_rank=8",
                 "--name", "golden", cwd=project.experiments)
    assert result.code == 0, result.err
    script = project.experiments / "golden" / "trial-b" / "finetune.slurm"
    actual = normalized(script.read_text(), project.root)
    assert actual == (GOLDEN / "finetune-distributed.slurm").read_text()


def test_options_cover_known_and_pass_through_keys():
    profile = ResourceProfile(nodes=1, ntasks_per_node=2, time="1-00:00:00", account="cses",
                              mem=16, gres=2, qos="high", exclusive=True, requeue=False)
    assert sbatch_options(profile) == [
        "--nodes=1", "--ntasks-per-node=2", "--time=1-00:00:00", "--account=cses", "--mem=16G",
        "--gres=gpu:2", "--exclusive", "--qos=high"]


def test_a_profile_built_around_validation_is_still_refused():
    """Defense in depth: a value that skipped pydantic validation cannot reach the script."""
    sneaky = ResourceProfile.model_construct(account="x\n#SBATCH --uid=0")
    with pytest.raises(CruijffError, match="account"):
        sbatch_options(sneaky)


def test_command_words_are_quoted():
    script = render_script(
        job_name="j", resources=ResourceProfile(), command=["echo", "$(reboot)", "a b;c"],
        workdir=Path("/w"), log_file=Path("/w/logs/x-%j.out"), description="d\n#SBATCH --x")
    last = script.strip().splitlines()[-1]
    assert shlex.split(last) == ["exec", "echo", "$(reboot)", "a b;c"]
    assert [line for line in script.splitlines() if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=j", "#SBATCH --output=/w/logs/x-%j.out"]


def test_paths_slurm_cannot_take_are_refused():
    with pytest.raises(CruijffError, match="characters Slurm cannot take"):
        render_script(job_name="j", resources=ResourceProfile(), command=["true"],
                      workdir=Path("/w x"), log_file=Path("/w x/log"), description="d")
