"""Generated batch scripts: pinned by golden files, and safe whatever the config says."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
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


PROLOGUE = """slurm:
  prologue:
    - module load cuda/12.4
    - source /opt/venvs/site/bin/activate
    - 'conda activate "my env"  # quoted: a name with a space'
"""


def build_golden(cli, project, config: str = ""):
    project.config.write_text(project.config.read_text() + config)
    return cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
               "--dataset", "d.json", "--treatment", "torchtune.model.lora_rank=4",
               "--name", "golden", cwd=project.experiments)


def test_the_prologue_goes_into_every_script_after_the_header(cli, project):
    result = build_golden(cli, project, PROLOGUE)
    assert result.code == 0, result.err
    trial = project.experiments / "golden" / "trial-b"
    actual = normalized((trial / "eval.slurm").read_text(), project.root)
    assert actual == (GOLDEN / "eval-prologue.slurm").read_text()
    assert subprocess.run(["bash", "-n", trial / "eval.slurm"]).returncode == 0  # it parses
    lines = (trial / "finetune.slurm").read_text().splitlines()
    site = ["module load cuda/12.4", "source /opt/venvs/site/bin/activate",
            'conda activate "my env"  # quoted: a name with a space']
    start = lines.index(site[0])
    assert lines[start:start + 3] == site
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < start
    assert start < next(i for i, line in enumerate(lines) if line.startswith("exec "))


@pytest.mark.parametrize("line", [
    "module load x\n#SBATCH --uid=0",          # a second line, and a directive on it
    "#SBATCH --uid=0",                          # a directive on its own
    "  #sbatch --export=ALL",
    "module load x\r",                          # a carriage return
    "echo a\x00b",                              # NUL
    "module\tload x",                           # a control character
    'echo "unclosed',                           # runs into the script's next lines
    "module load x \\",                         # so does a trailing backslash
    "cat <<EOF",                                # and a here-document
    "",
])
def test_a_prologue_line_that_is_not_one_shell_line_is_refused_at_build(cli, project, line):
    config = f"slurm:\n  prologue:\n    - module load ok\n    - {json.dumps(line)}\n"
    result = build_golden(cli, project, config)
    assert result.code == 2, result.out
    assert result.err.startswith("error: ") and len(result.err.strip().splitlines()) == 1
    assert "slurm.prologue: line 2 " in result.err
    assert list(project.experiments.iterdir()) == []  # nothing built, no staging left


def test_a_prologue_from_the_environment_is_checked_the_same_way(cli, project, monkeypatch):
    monkeypatch.setenv("CRUIJFF_SLURM__PROLOGUE", json.dumps(["echo ok", "x\n#SBATCH -A y"]))
    result = build_golden(cli, project)
    assert result.code == 2 and "line 2" in result.err
    assert list(project.experiments.iterdir()) == []


def test_a_prologue_built_around_validation_is_still_refused():
    with pytest.raises(CruijffError, match="line 1"):
        render_script(job_name="j", resources=ResourceProfile(), command=["true"],
                      workdir=Path("/w"), log_file=Path("/w/log"), description="d",
                      prologue=["true\n#SBATCH --uid=0"])


def test_worker_jobs_start_with_the_prologue(cli, project, tmp_path):
    from cruijff.flows.clusters import group_by_profile, slurm_cluster

    from cruijff.runner import load_experiment

    assert build_golden(cli, project, PROLOGUE).code == 0
    exp = load_experiment(project.experiments / "golden")
    [(name, (profile, _))] = group_by_profile(exp.trials).items()
    tls = tmp_path / "tls"
    tls.mkdir(mode=0o700)
    with slurm_cluster(exp, name, profile, tls_dir=tls) as cluster:
        lines = cluster.job_script().splitlines()
    start = lines.index("module load cuda/12.4")
    assert lines[start + 1:start + 3] == ["source /opt/venvs/site/bin/activate",
                                          'conda activate "my env"  # quoted: a name with a space']
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < start
    assert start < lines.index("export CRUIJFF_STAGE_STEP=1")
    assert start < next(i for i, line in enumerate(lines) if "distributed.cli" in line)
