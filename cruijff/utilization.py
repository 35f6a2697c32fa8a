"""What a stage attempt used beside what it asked for, read off its stage record.

One reading of the record for every view (`summary`, the report, the results store, the
Prefect task run), so they show the same figures: memory used is the most that either the
launcher (`usage.peak_rss_mib`) or Slurm (`slurm.max_rss_mib`) saw; what was asked is the
attempt's job request (`slurm.requested`: mem_mib, time_s). Memory is in MiB (Slurm's G is
1024 MiB). Earlier attempts are read from `record.history`, whose entries may carry outcome,
peak_rss_mib, wall_s and requested, or none of them (older records).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cruijff.state import StageRecord

MIB_PER_G = 1024
LOW_SHARE, HIGH_SHARE = 0.25, 0.90
"""A share of what was asked below LOW_SHARE is marked ▽ (over-asked: the job waited for
resources it left idle), above HIGH_SHARE ▲ (close to an OUT_OF_MEMORY or a TIMEOUT)."""
LOW_MARK, HIGH_MARK = "▽", "▲"


@dataclass
class AttemptUse:
    """One attempt's figures (None: not known) and its shares of what its job asked for."""

    attempt: int | None = None
    status: str | None = None
    wall_s: float | None = None
    """The launcher's wall time, else sacct's Elapsed, else cruijff's own clock."""
    cpu_s: float | None = None
    peak_rss_mib: float | None = None
    """The most of the launcher's and Slurm's peak resident memory."""
    gpu_peak_mib: float | None = None
    """The most memory any one GPU held (NVML's view, or the recipe's reserved peak)."""
    gpus: int = 0
    """Devices that held any memory."""
    asked_mem_mib: float | None = None
    asked_time_s: float | None = None
    mem_share: float | None = None
    time_share: float | None = None
    outcome: str | None = None
    """OUT_OF_MEMORY, TIMEOUT, NODE_FAIL, PREEMPTED, CANCELLED (Slurm's reason), or None."""
    sacct_state: str | None = None
    sacct_max_rss_mib: float | None = None
    throughput: dict[str, float] = field(default_factory=dict)
    size: dict[str, float] = field(default_factory=dict)
    final: bool | None = None
    """False: figures from the last snapshot of an attempt killed before its totals."""
    measured: bool = False
    """The record carries a measurement (usage or sacct figures), not only cruijff's clock."""

    @property
    def asked(self) -> bool:
        return self.asked_mem_mib is not None or self.asked_time_s is not None


def _number(value: Any) -> float | None:
    """A finite, non-negative float, or None (history entries are loosely checked)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    x = float(value)
    return x if math.isfinite(x) and x >= 0 else None


def _most(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _share(used: float | None, asked: float | None) -> float | None:
    return used / asked if used is not None and asked else None


def _asked(requested: Any) -> tuple[float | None, float | None]:
    if not isinstance(requested, dict):
        return None, None
    return _number(requested.get("mem_mib")), _number(requested.get("time_s"))


def _numbers(values: Any) -> dict[str, float]:
    if not isinstance(values, dict):
        return {}
    return {str(k): x for k, v in values.items() if (x := _number(v)) is not None}


def with_shares(use: AttemptUse) -> AttemptUse:
    """`use` with its shares of what was asked filled in."""
    use.mem_share = _share(use.peak_rss_mib, use.asked_mem_mib)
    use.time_share = _share(use.wall_s, use.asked_time_s)
    return use


def attempt_use(record: StageRecord) -> AttemptUse | None:
    """The record's own attempt; None for a stage reused from another trial (it ran there)."""
    if record.reused_from:
        return None
    usage, slurm = record.usage, record.slurm
    use = AttemptUse(attempt=record.attempts, status=record.status, outcome=record.outcome)
    use.wall_s = _number(usage.wall_s if usage else None)
    if use.wall_s is None and slurm is not None:
        use.wall_s = _number(slurm.elapsed_s)
    if use.wall_s is None:
        use.wall_s = _number(record.duration_s)
    if usage is not None:
        use.cpu_s = _number(usage.cpu_s)
        use.throughput, use.size = _numbers(usage.throughput), _numbers(usage.size)
        use.final = usage.final
        peaks = [_most(_number(g.peak_used_mib), _number(g.torch_peak_reserved_mib),
                       _number(g.torch_peak_allocated_mib)) for g in usage.gpus]
        used = [p for p in peaks if p]
        use.gpu_peak_mib, use.gpus = _most(*used), len(used)
    if slurm is not None:
        use.sacct_state, use.sacct_max_rss_mib = slurm.state, _number(slurm.max_rss_mib)
        use.asked_mem_mib, use.asked_time_s = _asked(slurm.requested)
        if use.cpu_s is None:
            use.cpu_s = _number(slurm.total_cpu_s)
    use.peak_rss_mib = _most(_number(usage.peak_rss_mib) if usage else None,
                             use.sacct_max_rss_mib)
    use.measured = usage is not None or (slurm is not None and (
        slurm.elapsed_s is not None or slurm.max_rss_mib is not None))
    return with_shares(use)


def earlier_uses(record: StageRecord) -> list[AttemptUse]:
    """The earlier attempts with this key that carry a figure or an outcome, oldest first."""
    uses = []
    for entry in record.history:
        if not isinstance(entry, dict):
            continue
        attempt = entry.get("attempt")
        outcome = entry.get("outcome")
        use = AttemptUse(attempt=attempt if isinstance(attempt, int) else None,
                         status=entry.get("status") if isinstance(entry.get("status"), str)
                         else None,
                         outcome=outcome if isinstance(outcome, str) and outcome else None,
                         wall_s=_number(entry.get("wall_s")),
                         peak_rss_mib=_number(entry.get("peak_rss_mib")))
        use.asked_mem_mib, use.asked_time_s = _asked(entry.get("requested"))
        use.measured = use.wall_s is not None or use.peak_rss_mib is not None
        if use.measured or use.outcome:
            uses.append(with_shares(use))
    return uses


# --- Text ------------------------------------------------------------------------------------


def memory_text(mib: float) -> str:
    """300M, 3.1G, 12G (Slurm's units: G = 1024 MiB)."""
    if mib < MIB_PER_G:
        return f"{mib:.0f}M"
    g = mib / MIB_PER_G
    return f"{g:.0f}G" if g >= 10 or g == int(g) else f"{g:.1f}G"


def _pair_memory(used: float, asked: float) -> str:
    """3.1/8G: used in the unit of what was asked."""
    if asked < MIB_PER_G:
        return f"{used:.0f}/{asked:.0f}M"
    g, a = used / MIB_PER_G, asked / MIB_PER_G
    shown = f"{a:.0f}" if a == int(a) else f"{a:.1f}"
    return f"{g:.1f}/{shown}G"


def duration_text(seconds: float) -> str:
    """42s, 4m12s, 30m, 1h30m, 2h."""
    s = round(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f}s"
    if s < 3600:
        m, rest = divmod(s, 60)
        return f"{m}m" if rest == 0 or m >= 10 else f"{m}m{rest:02d}s"
    h, m = divmod(round(s / 60), 60)
    return f"{h}h" if m == 0 else f"{h}h{m:02d}m"


def mark(share: float | None) -> str:
    if share is None:
        return ""
    return LOW_MARK if share < LOW_SHARE else HIGH_MARK if share > HIGH_SHARE else ""


def share_text(share: float | None) -> str:
    """39%, 13% ▽, 97% ▲."""
    if share is None:
        return ""
    sign = mark(share)
    return f"{share:.0%}" + (f" {sign}" if sign else "")


def memory_figure(use: AttemptUse, *, share: bool = True) -> str:
    """3.1/8G 39% where memory was asked, 3.1G where not; "" when unknown."""
    if use.peak_rss_mib is None:
        return f"?/{memory_text(use.asked_mem_mib)}" if use.asked_mem_mib else ""
    if not use.asked_mem_mib:
        return memory_text(use.peak_rss_mib)
    text = _pair_memory(use.peak_rss_mib, use.asked_mem_mib)
    return f"{text} {share_text(use.mem_share)}" if share else text


def time_figure(use: AttemptUse, *, share: bool = True) -> str:
    """4m/30m 13% ▽ where time was asked, 4m where not; "" when unknown."""
    if use.wall_s is None:
        return f"?/{duration_text(use.asked_time_s)}" if use.asked_time_s else ""
    if not use.asked_time_s:
        return duration_text(use.wall_s)
    text = f"{duration_text(use.wall_s)}/{duration_text(use.asked_time_s)}"
    return f"{text} {share_text(use.time_share)}" if share else text


def throughput_text(throughput: dict[str, float]) -> str:
    """1234 tokens/s (a fine-tune), 3.2 samples/s (an eval), or ""."""
    for key, unit in (("tokens_per_s", "tokens/s"), ("samples_per_s", "samples/s")):
        value = throughput.get(key)
        if value is not None:
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return ""


def compute_text(use: AttemptUse) -> str:
    """The one-line figure summary prints after the stage name:
    `3.1/8G 39% · 4m/30m 13% ▽`, `OUT_OF_MEMORY at 2.1/2G`, `TIMEOUT at 30m/30m`."""
    if use.outcome == "OUT_OF_MEMORY":
        return f"OUT_OF_MEMORY at {memory_figure(use, share=False) or '?'}"
    if use.outcome == "TIMEOUT":
        return f"TIMEOUT at {time_figure(use, share=False) or '?'}"
    parts = [p for p in (memory_figure(use), time_figure(use)) if p]
    if use.gpu_peak_mib:
        parts.append(f"GPU {f'{use.gpus}× ' if use.gpus > 1 else ''}"
                     f"{memory_text(use.gpu_peak_mib)}")
    text = " · ".join(parts)
    if use.outcome:
        text = f"{use.outcome} {text}".strip()
    if use.final is False:
        text += " (last snapshot)"
    return text


def use_line(use: AttemptUse) -> str:
    """A sentence for a log: `wall 4m12s of 30m (14% ▽), CPU 8m, peak RSS 3.1G of 8G (39%),
    GPU 10G, 1234 tokens/s`."""
    parts = []
    if use.outcome:
        parts.append(use.outcome)
    if use.wall_s is not None:
        asked = (f" of {duration_text(use.asked_time_s)} ({share_text(use.time_share)})"
                 if use.asked_time_s else "")
        parts.append(f"wall {duration_text(use.wall_s)}{asked}")
    if use.cpu_s is not None:
        parts.append(f"CPU {duration_text(use.cpu_s)}")
    if use.peak_rss_mib is not None:
        asked = (f" of {memory_text(use.asked_mem_mib)} ({share_text(use.mem_share)})"
                 if use.asked_mem_mib else "")
        parts.append(f"peak RSS {memory_text(use.peak_rss_mib)}{asked}")
    if use.gpu_peak_mib:
        parts.append(f"GPU {f'{use.gpus}× ' if use.gpus > 1 else ''}"
                     f"{memory_text(use.gpu_peak_mib)}")
    if rate := throughput_text(use.throughput):
        parts.append(rate)
    if use.final is False:
        parts.append("(last snapshot of a killed attempt)")
    return ", ".join(parts) if parts else "nothing measured"


def use_row(trial: str, stage: str, use: AttemptUse) -> dict[str, str]:
    """One table row of text cells (a Prefect table artifact)."""
    def figure(value: float | None, text: Any) -> str:
        return "" if value is None else text(value)

    return {"trial": trial, "stage": stage, "attempt": str(use.attempt or ""),
            "status": use.status or "", "outcome": use.outcome or "",
            "wall": figure(use.wall_s, duration_text), "CPU": figure(use.cpu_s, duration_text),
            "peak RSS": figure(use.peak_rss_mib, memory_text),
            "GPU peak": figure(use.gpu_peak_mib, memory_text),
            "asked": " · ".join(t for t in (figure(use.asked_mem_mib, memory_text),
                                            figure(use.asked_time_s, duration_text)) if t),
            "memory use": share_text(use.mem_share), "time use": share_text(use.time_share),
            "throughput": throughput_text(use.throughput)}
