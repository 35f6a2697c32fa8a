"""Files cruijff writes follow the umask, so a lab's shared project folder stays readable by
collaborators: configs, scripts, records and reports, atomically written ones included."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cruijff.fileio import atomic_write_text, umask
from cruijff.state import StageRecord, write_record


@pytest.fixture
def mask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
            for p in root.rglob("*") if not p.is_symlink()}


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077], indirect=True)
def test_umask_is_read_without_changing_it(mask):
    assert umask() == mask
    assert umask() == mask


@pytest.mark.parametrize("mask", [0o002, 0o077], indirect=True)
def test_an_atomically_written_file_gets_the_mode_open_would_give(mask, tmp_path):
    atomic_write_text(tmp_path / "a.yaml", "x: 1\n")
    (tmp_path / "plain.yaml").write_text("x: 1\n")
    assert modes(tmp_path) == {"a.yaml": 0o666 & ~mask, "plain.yaml": 0o666 & ~mask}


@pytest.mark.parametrize("mask", [0o002], indirect=True)
def test_a_built_experiment_and_its_records_are_group_writable_under_umask_002(
        mask, cli, project):
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model",
                 "cruijff/tiny-llama-random", "--dataset", "d.json", "--treatment",
                 "finetune.model.lora_rank=4", "--name", "exp", "--root", project.experiments)
    assert result.code == 0, result.err
    exp = project.experiments / "exp"
    write_record(exp / "trial-a", StageRecord("eval", "k", "done"))
    found = modes(exp)
    assert any(name.endswith(".slurm") for name in found)
    assert any(name.startswith("trial-a/.cruijff/") for name in found)
    wrong = {name: oct(mode) for name, mode in found.items()
             if mode not in (0o664, 0o775)}
    assert not wrong, wrong
