"""scripts/gpu-check.sh: one line and exit 0 without CUDA. Its checks and report, exercised
with device cpu (`--cpu`): they pass there, fail when asked whether those stages ran on the
GPU, and pass on the same files made to look as a GPU run leaves them."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu-check.sh"
MODELS = ("cruijff/tiny-llama-random", "cruijff/tiny-qwen2.5")
"""Two: the parsing and the report, not the families (tests/test_model_families.py)."""
TRIALS = ("a", "b")
"""The script's models, with the quickstart's tiny-llama in its random twin (the same code
paths; no pretraining, which takes minutes on a busy CPU)."""


def gpu_check(*args: object, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real check")
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    done = gpu_check(timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"gpu-check: no CUDA here (torch {torch.__version__}, CUDA {torch.version.cuda}: "
        "torch.cuda.is_available() is False): nothing checked"]


def test_the_memory_hook_records_only_processes_that_import_torch(tmp_path):
    env = {"PATH": str(Path(sys.executable).parent), "CRUIJFF_GPU_CHECK_PEAKS": str(tmp_path),
           "PYTHONPATH": str(REPO / "scripts" / "lib" / "cuda_peak")}
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=60)
    assert list(tmp_path.iterdir()) == []
    subprocess.run([sys.executable, "-c", "import torch"], env=env, check=True, timeout=120)
    (record,) = tmp_path.iterdir()
    assert json.loads(record.read_text())["cuda"] is False


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`gpu-check.sh --cpu`, its folder kept."""
    work = tmp_path_factory.mktemp("gpu-check") / "work"
    return gpu_check("--cpu", "--keep", work, *(a for m in MODELS for a in ("--model", m))), work


def check_script(work: Path, *args: object) -> subprocess.CompletedProcess:
    """scripts/gpu_check.py on the experiment the script left in `work`."""
    return subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"),
                           str(work / "gpu-check"), "--peaks", str(work / "peaks"),
                           *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CRUIJFF_HOME": str(work / "home")})


@pytest.mark.slow
def test_cpu_mode_checks_and_reports_every_stage(cpu_run):
    done, _work = cpu_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu-check: OK: all 4 stages ran on cpu" in done.stdout
    table = [line.split() for line in done.stdout.splitlines()]
    for model in MODELS:
        for stage in ("finetune", "eval"):
            row = next(r for r in table if r[1:3] == [model, stage])
            assert row[3:5] == ["cpu,", "float32"], row  # the process's word, the precision
            assert row[5].endswith("s") and float(row[5][:-1]) > 0, row  # wall time
            assert row[6] == "-", row  # no GPU memory
            assert float(row[7].replace(",", "")) > 0, row  # tokens/s


@pytest.mark.slow
def test_stages_that_ran_on_the_cpu_fail_the_gpu_check(cpu_run):
    _done, work = cpu_run
    check = check_script(work, "--device", "cuda")
    assert check.returncode == 1, check.stdout + check.stderr
    failed = [line for line in check.stdout.splitlines() if line.startswith("FAILED")]
    for trial in TRIALS:
        mine = [f.split(": ", 1)[1] for f in failed if f.startswith(f"FAILED trial {trial} ")]
        assert any(f.startswith("torchtune logged no GPU memory") for f in mine), failed
        assert "its process allocated no CUDA memory: it did not run on the GPU" in mine, failed
        assert "Inspect's log has model_args device 'cpu'" in mine, failed
    assert check.stdout.splitlines()[-1] == \
        "gpu-check: 10 check(s) failed: not every stage ran on cuda"


@pytest.mark.slow
def test_what_a_gpu_run_leaves_passes_the_gpu_check(cpu_run, tmp_path, monkeypatch):
    """The CPU run's files, changed where a CUDA run differs: the device in the configs and in
    Inspect's log, torchtune's memory lines, the processes' CUDA records."""
    from inspect_ai.log import read_eval_log, write_eval_log

    from cruijff.state import read_record

    _done, work = cpu_run
    experiment = shutil.copytree(work / "gpu-check", tmp_path / "gpu-check", symlinks=True)
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check_module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check_module)  # for its dataclass
    spec.loader.exec_module(gpu_check_module)
    gib = 1024**3
    for number, trial in enumerate(TRIALS, 1):
        trial_dir = experiment / f"trial-{trial}"
        config = yaml.safe_load((trial_dir / "finetune.yaml").read_text())
        (trial_dir / "finetune.yaml").write_text(yaml.safe_dump({**config, "device": "cuda"}))
        (step_log,) = (trial_dir / "logs" / "finetune").glob("log_*.txt")
        step_log.write_text("".join(f"{line} peak_memory_alloc:{number / 10}\n"
                                    for line in step_log.read_text().splitlines()))
        (attempt_log,) = (trial_dir / "logs").glob("finetune-attempt*.log")
        attempt_log.write_text(attempt_log.read_text().replace("torch.float32", "torch.bfloat16")
                               + "\tGPU peak memory allocation: 0.05 GiB\n")
        log_path = str(trial_dir / read_record(trial_dir, "eval").outputs[0])
        log = read_eval_log(log_path)
        log.eval.model_args = {**log.eval.model_args, "device": "cuda", "dtype": "bfloat16"}
        write_eval_log(log, log_path)

        rows = {}
        for stage, allocated in (("finetune", 0.02 * gib), ("eval", number * gib)):
            record = {"argv": ["x", str(trial_dir / f"{stage}.yaml")], "cwd": str(trial_dir),
                      "cuda": True, "device": "Some GPU", "max_memory_allocated": allocated}
            rows[stage] = row = gpu_check_module.Row(trial, "m", stage)
            getattr(gpu_check_module, f"check_{stage}")(row, trial_dir, record, "cuda")
            assert row.problems == [], row
            assert row.device == "cuda (Some GPU), bfloat16", row
        # torchtune's largest logged step peak beats the exit value and the init peak
        assert rows["finetune"].peak_bytes == pytest.approx(number / 10 * gib)
        assert rows["eval"].peak_bytes == number * gib
        assert rows["finetune"].tokens_per_s > 0 and rows["eval"].tokens_per_s > 0
