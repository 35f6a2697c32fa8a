"""Disk faults: a folder cruijff must write to is not writable, and the disk filling up while
torchtune writes a checkpoint (a small tmpfs mounted for the test).

Mounting needs root: on a laptop these tests use chmod where they can and skip the rest; CI
runs as root, refuses to start on a machine that cannot mount, and sets
CRUIJFF_REQUIRE_MOUNT=1, turning such a skip into a failure."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cruijff, make_site

from cruijff.state import read_record

TINY = "cruijff/tiny-llama-random"
FAST = ["--control", "torchtune.epochs=1", "--control", "torchtune.max_steps_per_epoch=4",
        "--control", "torchtune.lr_scheduler.num_warmup_steps=0", "--control", "eval.limit=2"]


def _can_mount() -> bool:
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", folder],
                               capture_output=True)
        if probe.returncode != 0:
            return False
        subprocess.run(["umount", folder], check=True)
    return True


CAN_MOUNT = _can_mount()


def require_mount() -> None:
    if not CAN_MOUNT:
        if os.environ.get("CRUIJFF_REQUIRE_MOUNT") == "1":
            pytest.fail("CRUIJFF_REQUIRE_MOUNT=1 but this machine cannot mount a tmpfs")
        pytest.skip("needs root and mount (a tmpfs); CI runs it")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` read-only for cruijff: a read-only bind mount as root (root ignores modes),
    else its mode."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if not p.is_symlink()}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    require_mount()
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def snapshot(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")
                  if p.is_file())


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.fixture
def site(tmp_path, tiny_random_model):
    (tmp_path / "site").mkdir()
    return make_site(tmp_path / "site", tiny_random_model)


def test_building_into_a_folder_that_is_not_writable(site, prefect_env):
    root = site / "experiments"
    root.mkdir()
    with read_only(root):
        result = cruijff("build", "--config-path", site / "config.yaml", "--root", root,
                         "--name", "ro", "--task", "capitalization", "--model", TINY,
                         "--dataset", "words_5L_80_1000.json", env=prefect_env)
    assert result.returncode == 2
    line = one_error_line(result)
    assert str(root) in line and ("Read-only" in line or "Permission denied" in line)
    assert list(root.iterdir()) == []


def test_running_an_experiment_whose_folder_is_not_writable(site, prefect_env):
    built = cruijff("build", "--config-path", site / "config.yaml", "--root", site,
                    "--name", "ro-run", "--task", "capitalization", "--model", TINY,
                    "--dataset", "words_5L_80_1000.json", "--control", "use_fine_tune=false",
                    env=prefect_env)
    assert built.returncode == 0, built.stderr
    exp = site / "ro-run"
    before = snapshot(exp)
    with read_only(exp):
        result = cruijff("run", exp, env=prefect_env)
        summary = cruijff("summary", "--json", exp, env=prefect_env)
    assert result.returncode == 2
    line = one_error_line(result)
    assert str(exp) in line and "writable" in line
    assert snapshot(exp) == before
    assert summary.returncode == 1 and json.loads(summary.stdout)["trials"]  # reads still work


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_write_then_space_freed(site, prefect_env, tmp_path):
    require_mount()
    with tmpfs(tmp_path / "small", "1m") as root:
        built = cruijff("build", "--config-path", site / "config.yaml", "--root", root,
                        "--name", "full", "--task", "capitalization", "--model", TINY,
                        "--dataset", "words_5L_80_1000.json", *FAST, env=prefect_env)
        assert built.returncode == 0, built.stderr
        exp = root / "full"
        trial = exp / "trial-a"

        run = cruijff("run", exp, env=prefect_env)
        assert run.returncode == 1, run.stdout + run.stderr
        assert "Traceback" not in run.stdout + run.stderr
        record = read_record(trial, "finetune")
        assert record is not None and not record.is_done
        summary = cruijff("summary", "--json", exp, env=prefect_env)
        assert summary.returncode == 1
        stages = json.loads(summary.stdout)["trials"][0]["stages"]
        assert stages["finetune"]["state"] in ("failed", "interrupted")
        if stages["finetune"]["state"] == "failed":
            assert "No space left on device" in stages["finetune"]["error"]
        assert stages["eval"]["state"] in ("pending", "blocked")

        subprocess.run(["mount", "-o", "remount,size=64m", str(root)], check=True)
        again = cruijff("run", exp, env=prefect_env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert read_record(trial, "finetune").status == "done"
        assert read_record(trial, "eval").status == "done"
        assert any((trial / "checkpoints" / "final").glob("*.safetensors"))
