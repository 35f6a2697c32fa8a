"""What a stage attempt used, measured from outside by `python -m cruijff.usage`: the whole
process tree's peak resident memory and CPU time, exit status passed on, a snapshot left by
an attempt killed with its launcher; and the record of a stage run by the runner carrying
its figures (tests/test_runner.py's in-process pipeline, no Prefect)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cruijff.pipeline import RunPlan, run_in_process
from cruijff.state import read_record

LAUNCHER = [sys.executable, "-m", "cruijff.usage", "--out"]


def launch(out: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCHER, str(out), "--", sys.executable, "-c",
                           textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


HOLD = "from cruijff.testing.compute_stage import hold; "


def test_the_peak_is_the_whole_trees_and_cpu_is_the_trees(tmp_path):
    """Three processes holding 60 MiB each at once: the peak counts all three (the largest
    single process would say ~60); CPU time counts the busy child too."""
    out = tmp_path / "usage.json"
    result = launch(out, f"""
        import subprocess, sys
        code = {HOLD!r} + "hold(60, 2.5, 0.8)"
        children = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
        {HOLD}hold(60, 2.5, 0.0)
        for child in children:
            child.wait()
    """, CRUIJFF_USAGE_INTERVAL_S="0.1")
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["final"] is True
    assert figures["peak_rss_mib"] >= 3 * 60 * 0.9, figures
    assert 55 <= figures["largest_process_rss_mib"] < 120, figures
    assert figures["max_processes"] == 3
    assert figures["cpu_s"] >= 1.5, figures  # two children busy for 0.8 s each
    assert figures["wall_s"] >= 2.5
    assert figures["samples"] >= 5


def test_the_stages_exit_status_and_signal_are_passed_on(tmp_path):
    out = tmp_path / "usage.json"
    assert launch(out, "import sys; sys.exit(3)").returncode == 3
    assert json.loads(out.read_text())["final"] is True
    killed = launch(out, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode == -signal.SIGKILL
    assert json.loads(out.read_text())["final"] is True


def test_an_orphan_of_the_stage_is_still_counted(tmp_path):
    """A grandchild whose parent exited (a daemonized helper) is adopted by the launcher (a
    subreaper), not by init: its memory still counts."""
    out = tmp_path / "usage.json"
    result = launch(out, f"""
        import subprocess, sys
        code = "import os, subprocess, sys; subprocess.Popen([sys.executable, '-c', " \\
               "{HOLD!r} + 'hold(80, 2.0, 0)']); os._exit(0)"
        subprocess.run([sys.executable, "-c", code])
        {HOLD}hold(0, 2.5, 0)
    """, CRUIJFF_USAGE_INTERVAL_S="0.1")
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["peak_rss_mib"] >= 80 * 0.9


def test_an_attempt_killed_with_its_launcher_leaves_its_last_snapshot(tmp_path):
    """An OOM kill or a TIMEOUT takes the launcher down with the stage: the last snapshot
    (not final) still says what the attempt reached; the stage dies with its launcher."""
    out = tmp_path / "usage.json"
    marker = tmp_path / "child.pid"
    proc = subprocess.Popen([*LAUNCHER, str(out), "--", sys.executable, "-c",
                             f"import os; open({str(marker)!r}, 'w').write(str(os.getpid())); "
                             f"{HOLD}hold(100, 120, 0)"],
                            env={**os.environ, "CRUIJFF_USAGE_INTERVAL_S": "0.1",
                                 "CRUIJFF_USAGE_SNAPSHOT_S": "0.2"})
    deadline = time.monotonic() + 60
    figures: dict = {}
    while figures.get("peak_rss_mib", 0) < 90 and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            figures = json.loads(out.read_text())
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert figures.get("peak_rss_mib", 0) >= 90, figures
    assert figures["final"] is False
    child = int(marker.read_text())
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # PDEATHSIG: the kernel kills it as the launcher dies
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(
        f"/proc/{child}/stat").read_text().split()[2]


def test_bad_arguments_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cruijff.usage", "ls"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "usage: python -m cruijff.usage --out FILE -- COMMAND [ARG...]"


@pytest.fixture
def make(doubles):
    return lambda treatments: doubles(["testing_compute"], treatments)


def test_a_stage_record_carries_what_its_attempt_used(make):
    exp = make([{"testing_compute.allocate_mb": 120, "testing_compute.hold_s": 1.5,
                 "testing_compute.cpu_s": 0.5, "testing_compute.tokens": 1000},
                {"testing_compute.allocate_mb": 10}])
    assert run_in_process(RunPlan.make(exp, workers=2)) == {
        "a": {"testing_compute": "done"}, "b": {"testing_compute": "done"}}
    usage = read_record(exp / "trial-a", "testing_compute").usage
    assert usage is not None and usage.final
    assert usage.peak_rss_mib >= 120
    assert usage.cpu_s >= 0.5
    assert usage.wall_s >= 1.5
    assert usage.throughput == {"training_tokens": 1000.0, "train_s": 1.5}
    assert usage.sampler_cpu_s < usage.cpu_s
    other = read_record(exp / "trial-b", "testing_compute").usage
    assert other is not None and other.peak_rss_mib < usage.peak_rss_mib - 80


def test_measuring_can_be_switched_off(make, monkeypatch):
    exp = make([{"testing_compute.allocate_mb": 1}])
    monkeypatch.setenv("CRUIJFF_USAGE", "off")
    run_in_process(RunPlan.make(exp))
    record = read_record(exp / "trial-a", "testing_compute")
    assert record.status == "done" and record.usage is None


def test_a_record_written_before_usage_was_measured_is_still_read(make):
    """Records of an older cruijff have no usage/slurm/outcome/grown: still done."""
    exp = make([{"testing_compute.allocate_mb": 1}])
    run_in_process(RunPlan.make(exp))
    path = exp / "trial-a" / ".cruijff" / "testing_compute.json"
    data = json.loads(path.read_text())
    for field in ("usage", "slurm", "outcome", "grown"):
        del data[field]
    path.write_text(json.dumps(data))
    record = read_record(exp / "trial-a", "testing_compute")
    assert record is not None and record.status == "done" and record.usage is None
    assert RunPlan.make(exp).todo() == []


FAKE_NVML = '''
"""A stand-in for pynvml (no GPU here): two devices; device 1's memory in use grows by
100 MiB each time it is read, device 0's stays at 10 MiB."""
import types
reads = {0: 0, 1: 0}
def nvmlInit(): pass
def nvmlDeviceGetCount(): return 2
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetUUID(h): return f"GPU-fake-{h}"
def nvmlDeviceGetName(h): return b"Fake H200"
def nvmlDeviceGetMemoryInfo(h):
    reads[h] += 1
    used = 10 if h == 0 else 100 * reads[h]
    return types.SimpleNamespace(total=141 * 2**30, used=used * 2**20)
'''


@pytest.mark.parametrize(("visible", "devices"), [("", ["GPU-fake-0", "GPU-fake-1"]),
                                                  ("1", ["GPU-fake-1"]),
                                                  ("GPU-fake-0", ["GPU-fake-0"])])
def test_gpu_memory_is_sampled_per_visible_device_with_a_fake_nvml(tmp_path, visible, devices):
    """Mocked: no GPU on this machine, so pynvml is a stand-in module; what is tested is
    which devices are read (CUDA_VISIBLE_DEVICES by index or UUID) and that the peak is kept."""
    (tmp_path / "pynvml.py").write_text(FAKE_NVML)
    out = tmp_path / "usage.json"
    result = launch(out, "import time; time.sleep(1.0)", CRUIJFF_USAGE_NVML="1",
                    CRUIJFF_USAGE_INTERVAL_S="0.1", CUDA_VISIBLE_DEVICES=visible,
                    PYTHONPATH=f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    assert result.returncode == 0, result.stderr
    gpus = {g["device"]: g for g in json.loads(out.read_text())["gpus"]}
    assert sorted(gpus) == devices
    assert all(g["name"] == "Fake H200" and g["total_mib"] == 141 * 1024 for g in gpus.values())
    if "GPU-fake-0" in gpus:
        assert gpus["GPU-fake-0"]["peak_used_mib"] == 10
    if "GPU-fake-1" in gpus:
        assert gpus["GPU-fake-1"]["peak_used_mib"] >= 500  # read at least 5 times, kept the max


def test_any_torchtune_recipes_log_gives_its_speed_and_gpu_peaks(tmp_path):
    """torchtune's metric log (DiskLogger) as a CUDA run with log_peak_memory_stats writes it:
    the median tokens/s per GPU times the processes; the recipe's peaks in GiB, as MiB."""
    from cruijff.stages.finetune import logged_throughput

    (tmp_path / "log_1.txt").write_text(
        "Step 1 | loss:2.5 lr:0.0003 tokens_per_second_per_gpu:100.0 peak_memory_active:1.0 "
        "peak_memory_alloc:1.5 peak_memory_reserved:2.0\n"
        "Step 2 | loss:2.4 lr:0.0003 tokens_per_second_per_gpu:300.0 peak_memory_active:1.0 "
        "peak_memory_alloc:1.25 peak_memory_reserved:2.5\n"
        "Step 3 | loss:2.3 lr:0.0003 tokens_per_second_per_gpu:200.0\n")
    assert logged_throughput(tmp_path, processes=4) == {
        "tokens_per_s": 800.0, "torch_peak_allocated_mib": 1536.0,
        "torch_peak_reserved_mib": 2560.0}
    assert logged_throughput(tmp_path / "none", processes=1) == {}
