"""A history of stage runs for `cruijff resources` and build warnings: experiment folders as
`cruijff build` writes them, with stage records (as a run writes them) holding chosen usage
figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cruijff.state import GpuUse, SlurmAccounting, StageRecord, Usage, write_record

M1 = "meta-llama/Llama-3.2-1B-Instruct"
M3 = "meta-llama/Llama-3.2-3B-Instruct"
GIB = 1024
DAY = "2026-11-30T12:00:00+00:00"
H100 = 81559
"""MiB of one device."""


@dataclass
class Attempt:
    """One stage record: what its attempt used and how it ended."""

    stage: str
    wall_s: float
    memory_mib: float | None = None
    work_s: float | None = None
    """Its own work time: throughput train_s (finetune) or eval_s (eval)."""
    size: dict[str, float] = field(default_factory=dict)
    gpu_peaks_mib: list[int] = field(default_factory=list)
    status: str = "done"
    outcome: str | None = None
    requested: dict[str, Any] = field(default_factory=dict)
    sacct_mib: float | None = None
    final: bool = True
    reused_from: str | None = None

    def record(self) -> StageRecord:
        throughput = {} if self.work_s is None else {
            "train_s" if self.stage == "finetune" else "eval_s": self.work_s}
        usage = None if self.reused_from else Usage(
            wall_s=self.wall_s, peak_rss_mib=self.memory_mib, samples=10, final=self.final,
            throughput=throughput, size=dict(self.size),
            gpus=[GpuUse(str(i), total_mib=H100, peak_used_mib=p)
                  for i, p in enumerate(self.gpu_peaks_mib)])
        slurm = None
        if self.requested or self.sacct_mib is not None or self.outcome:
            slurm = SlurmAccounting("4242", requested=dict(self.requested),
                                    max_rss_mib=self.sacct_mib, state=self.outcome)
        return StageRecord(self.stage, "k", self.status, finished=DAY,  # type: ignore[arg-type]
                           duration_s=self.wall_s, usage=usage, slurm=slurm,
                           outcome=self.outcome, reused_from=self.reused_from)  # type: ignore[arg-type]


def write_experiment(root: Path, name: str, model: str, attempts: list[Attempt], *,
                     stages: list[str] | None = None, sizes: dict[str, Any] | None = None,
                     resources: dict[str, Any] | None = None,
                     stage_resources: dict[str, Any] | None = None,
                     config_path: Path | None = None) -> Path:
    """An experiment of one trial `a` of `model` with these stage records."""
    path = root / name
    trial_dir = path / "trial-a"
    (trial_dir / ".cruijff").mkdir(parents=True)
    stages = stages or list(dict.fromkeys(a.stage for a in attempts))
    (path / "config.yaml").write_text(yaml.safe_dump({
        "name": name, "task": "toy", "created": DAY, "cruijff_version": "0.1.0",
        **({"config_path": str(config_path)} if config_path else {}),
        "config": {}, "design": {}, "notices": [],
        "trials": [{"id": "a", "model": model, "dataset": "d.json", "label": "control",
                    "control": None, "stages": stages}]}, sort_keys=False))
    trial: dict[str, Any] = {
        "id": "a", "model": model, "dataset": "d.json", "label": "control",
        "experiment": name, "task": "toy", "model_path": f"/models/{model}",
        "data_path": "/data/d.json", "resources": resources or {}, "stages": stages}
    if stage_resources:
        trial["stage_resources"] = stage_resources
    if sizes is not None:
        trial["sizes"] = sizes
    (trial_dir / "config.yaml").write_text(yaml.safe_dump(trial, sort_keys=False))
    for attempt in attempts:
        write_record(trial_dir, attempt.record())
    return path


def finetune_run(i: int) -> Attempt:
    """Run i of the history's fine-tunes: (i + 1) GiB; 600 + 60 i s of wall time, of which
    the first 100 s are startup (train_s = wall - 100); 1 epoch of 100 examples; run 7 used
    two GPUs, run 3 one (its second device's peak is under 5 % of it), the rest one."""
    gpus = {7: [30000, 60000], 3: [30000, 500]}.get(i, [30000])
    wall = 600 + 60 * i
    return Attempt("finetune", wall, (i + 1) * GIB, work_s=wall - 100,
                   size={"epochs": 1, "train_examples": 100, "batch_size": 4,
                         "parameters": 1e9}, gpu_peaks_mib=gpus)


def eval_run(i: int) -> Attempt:
    """Run i of the history's evals: (i + 1) / 2 GiB, 60 + 10 i s on 100 samples, reporting
    no eval_s (so its whole wall time scales)."""
    return Attempt("eval", 60 + 10 * i, (i + 1) * GIB / 2,
                   size={"eval_samples": 100, "parameters": 1e9})


def make_history(root: Path, n: int = 20, *, model: str = M1, prefix: str = "hist") -> list[Path]:
    """n experiments, each one trial whose finetune and eval ran once (finetune_run(i),
    eval_run(i))."""
    root.mkdir(parents=True, exist_ok=True)
    return [write_experiment(root, f"{prefix}-{i:02d}", model, [finetune_run(i), eval_run(i)],
                             resources={"mem": 32, "time": "02:00:00", "gres": 2})
            for i in range(n)]


TARGET_SIZES = {"finetune": {"epochs": 2, "train_examples": 100, "batch_size": 4,
                             "parameters": 1e9},
                "eval": {"eval_samples": 200, "parameters": 1e9}}


def make_target(root: Path, *, model: str = M1, config_path: Path | None = None,
                parameters: float = 1e9, name: str = "target") -> Path:
    """An experiment not run yet: twice the fine-tune work (2 epochs of 100 examples) and
    twice the eval samples (200) of the history's runs."""
    sizes = {stage: {**size, "parameters": parameters} for stage, size in TARGET_SIZES.items()}
    return write_experiment(root, name, model, [], stages=["finetune", "eval"], sizes=sizes,
                            resources={"time": "00:30:00", "mem": 8, "gres": 1},
                            config_path=config_path)
