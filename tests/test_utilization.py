"""What an attempt used beside what it asked for, read off records with chosen figures (the
reading summary, the report, the store and the Prefect task run share)."""

from __future__ import annotations

import pytest

from cruijff.state import GpuUse, SlurmAccounting, StageRecord, Usage
from cruijff.utilization import (
    attempt_use,
    compute_text,
    duration_text,
    earlier_uses,
    memory_text,
    use_line,
    use_row,
)

G = 1024  # MiB in Slurm's G


def record(**fields) -> StageRecord:
    return StageRecord("finetune", "k", fields.pop("status", "done"), **fields)


def slurm(mem_g: float = 8, time_s: float = 1800, **fields) -> SlurmAccounting:
    return SlurmAccounting("41", "3", requested={"mem_mib": mem_g * G, "time_s": time_s},
                           source="sacct", **fields)


def test_a_slurm_stage_shows_used_of_asked_with_the_share_and_a_mark():
    use = attempt_use(record(usage=Usage(wall_s=240, cpu_s=400, peak_rss_mib=3.1 * G),
                             slurm=slurm(state="COMPLETED")))
    assert use.mem_share == pytest.approx(3.1 / 8) and use.time_share == pytest.approx(240 / 1800)
    assert compute_text(use) == "3.1/8G 39% · 4m/30m 13% ▽"


def test_memory_used_is_the_most_of_the_launchers_and_slurms_view():
    use = attempt_use(record(usage=Usage(wall_s=60, peak_rss_mib=1000),
                             slurm=slurm(mem_g=2, time_s=70, max_rss_mib=1900)))
    assert use.peak_rss_mib == 1900 and use.sacct_max_rss_mib == 1900
    assert compute_text(use) == "1.9/2G 93% ▲ · 1m/1m10s 86%"
    alone = attempt_use(record(slurm=slurm(max_rss_mib=2.0 * G, elapsed_s=100,
                                           total_cpu_s=90)))
    assert (alone.peak_rss_mib, alone.wall_s, alone.cpu_s, alone.measured) == (
        2.0 * G, 100, 90, True)


def test_a_local_stage_shows_what_it_used_only():
    use = attempt_use(record(usage=Usage(wall_s=252, peak_rss_mib=3174, gpus=[
        GpuUse("GPU-1", peak_used_mib=10240), GpuUse("GPU-2", torch_peak_reserved_mib=9000),
        GpuUse("GPU-3", peak_used_mib=0)], throughput={"tokens_per_s": 1234.4})))
    assert not use.asked and use.mem_share is None
    assert (use.gpu_peak_mib, use.gpus) == (10240, 2)
    assert compute_text(use) == "3.1G · 4m12s · GPU 2× 10G"
    assert use_line(use) == "wall 4m12s, peak RSS 3.1G, GPU 2× 10G, 1234 tokens/s"


def test_out_of_memory_and_timeout_say_so_with_the_figure_reached():
    oom = attempt_use(record(status="failed", outcome="OUT_OF_MEMORY",
                             usage=Usage(wall_s=30, peak_rss_mib=2.1 * G, final=False),
                             slurm=slurm(mem_g=2, state="OUT_OF_MEMORY")))
    assert compute_text(oom) == "OUT_OF_MEMORY at 2.1/2G"
    assert use_line(oom).startswith("OUT_OF_MEMORY, wall 30s of 30m (2% ▽), ")
    assert use_line(oom).endswith("(last snapshot of a killed attempt)")
    timeout = attempt_use(record(status="failed", outcome="TIMEOUT",
                                 slurm=slurm(time_s=1800, elapsed_s=1800, state="TIMEOUT")))
    assert compute_text(timeout) == "TIMEOUT at 30m/30m"


def test_earlier_attempts_are_read_from_history_whatever_they_carry():
    history = [
        {"attempt": 1, "status": "failed", "where": "slurm:40", "error": "x",
         "outcome": "OUT_OF_MEMORY", "peak_rss_mib": 2150, "wall_s": 31.5,
         "requested": {"mem_mib": 2048, "time_s": 1800}},
        {"attempt": 2, "status": "failed", "where": "local:h:1", "error": "y"},  # older record
        {"attempt": 3, "status": "failed", "outcome": "TIMEOUT", "wall_s": "long",
         "peak_rss_mib": float("nan"), "requested": "8G"},  # loosely checked: tolerated
        "not a dict",
    ]
    uses = earlier_uses(record(history=history))  # type: ignore[arg-type]
    assert [(u.attempt, u.outcome) for u in uses] == [(1, "OUT_OF_MEMORY"), (3, "TIMEOUT")]
    assert compute_text(uses[0]) == "OUT_OF_MEMORY at 2.1/2G"
    assert compute_text(uses[1]) == "TIMEOUT at ?"


def test_a_reused_stage_has_no_figures_of_its_own():
    assert attempt_use(record(status="reused", reused_from="a")) is None


def test_an_unmeasured_record_falls_back_to_cruijffs_clock():
    use = attempt_use(record(duration_s=12.0))
    assert use.wall_s == 12.0 and not use.measured and compute_text(use) == "12s"


@pytest.mark.parametrize(("mib", "text"), [(300, "300M"), (1024, "1G"), (3174, "3.1G"),
                                           (12.4 * G, "12G")])
def test_memory_text(mib, text):
    assert memory_text(mib) == text


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0.4s"), (42, "42s"), (252, "4m12s"),
                                               (1800, "30m"), (5400, "1h30m"), (7200, "2h")])
def test_duration_text(seconds, text):
    assert duration_text(seconds) == text


def test_small_asks_stay_in_mib_and_a_row_has_text_cells():
    use = attempt_use(record(usage=Usage(wall_s=5, peak_rss_mib=300, cpu_s=4,
                                         throughput={"samples_per_s": 3.21}),
                             slurm=SlurmAccounting("9", requested={"mem_mib": 512})))
    assert compute_text(use) == "300/512M 59% · 5s"
    assert use_row("a", "eval", use) == {
        "trial": "a", "stage": "eval", "attempt": "1", "status": "done", "outcome": "",
        "wall": "5s", "CPU": "4s", "peak RSS": "300M", "GPU peak": "", "asked": "512M",
        "memory use": "59%", "time use": "", "throughput": "3.21 samples/s"}
