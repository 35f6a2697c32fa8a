"""Synthetic finished experiments for the store and report tests (and the analyze benchmark).

    from results_support import SyntheticTrial, make_experiment

    exp = make_experiment(tmp_path / "exp", [
        SyntheticTrial("a", scores=[1, 0, 1, 1], losses=[2.0, 1.0, 0.5]),
        SyntheticTrial("b", scores=[1, 1, 1, 1], control="a", treatment={"eval.x": 1}),
        SyntheticTrial("c", control="a", eval_status="failed"),
    ])

Writes what `cruijff build` and a run leave on disk, and nothing more: the experiment's
config.yaml, per trial its config.yaml, stage records (cruijff.state.write_record), a real
Inspect log (`write_eval_log`, samples with CORRECT/INCORRECT or numeric scores) and a
torchtune-style loss log. Nothing is trained or evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cruijff.experiment import trial_dir_name
from cruijff.fileio import dump_yaml
from cruijff.state import StageRecord, write_record

MODEL = "cruijff/tiny-llama"
DATASET = "words.json"
SCORER = "exact_match"


@dataclass
class SyntheticTrial:
    id: str
    scores: Sequence[float | str] = ()
    """Per-sample score values: 1/0 are written as CORRECT/INCORRECT ("C"/"I"); other numbers
    as they are; strings as given."""
    sample_ids: Sequence[str] | None = None
    """Default: s000, s001, ... (one per score)."""
    control: str | None = None
    treatment: dict[str, Any] = field(default_factory=dict)
    losses: Sequence[float] = ()
    """Fine-tune loss per step; empty means no fine-tune stage."""
    eval_status: str | None = "done"
    """done, failed, running, or None (no eval record: pending)."""
    epochs: int = 1
    eval_duration_s: float = 2.0
    finetune_duration_s: float = 3.0
    finetune_reused_from: str | None = None
    use_prompt_opt: bool = False

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.treatment.items()) or "control"


def make_experiment(path: Path, trials: Sequence[SyntheticTrial], name: str | None = None,
                    task: str = "capitalization") -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    name = name or path.name
    entries = []
    for trial in trials:
        stages = (["finetune"] if trial.losses or trial.finetune_reused_from else []) + ["eval"]
        entry = {
            "id": trial.id, "model": MODEL, "dataset": DATASET,
            "use_fine_tune": "finetune" in stages, "use_prompt_opt": trial.use_prompt_opt,
            "settings": {"eval.limit": 100, **trial.treatment}, "treatment": trial.treatment,
            "control": trial.control, "label": trial.label, "stages": stages,
        }
        entries.append(entry)
        trial_dir = path / trial_dir_name(trial.id)
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / "config.yaml").write_text(dump_yaml({**entry, "experiment": name,
                                                          "task": task}))
        _write_trial(trial_dir, trial)
    (path / "config.yaml").write_text(dump_yaml({
        "name": name, "task": task, "created": "2026-01-01T00:00:00", "config": {},
        "design": {}, "trials": entries,
    }))
    return path


def _write_trial(trial_dir: Path, trial: SyntheticTrial) -> None:
    if trial.finetune_reused_from:
        write_record(trial_dir, StageRecord("finetune", "ft-key", "reused",
                                            outputs=["checkpoints/final"],
                                            reused_from=trial.finetune_reused_from))
    elif trial.losses:
        logs = trial_dir / "logs" / "finetune"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / "log_1.txt").write_text("".join(
            f"Step {i} | loss:{loss} lr:0.001 tokens_per_second_per_gpu:100.0 \n"
            for i, loss in enumerate(trial.losses, 1)))
        write_record(trial_dir, StageRecord(
            "finetune", "ft-key", "done", duration_s=trial.finetune_duration_s,
            outputs=["checkpoints/final"], where="local:test:1",
            metrics={"loss_first": trial.losses[0], "loss_last": trial.losses[-1],
                     "steps": len(trial.losses)}))
    if trial.eval_status is None:
        return
    if trial.eval_status != "done":
        write_record(trial_dir, StageRecord(
            "eval", "eval-key", trial.eval_status,  # type: ignore[arg-type]
            error="ValueError: no split 'nope'" if trial.eval_status == "failed" else None,
            duration_s=1.0 if trial.eval_status == "failed" else None))
        return
    relative = "logs/eval/2026-01-01T00-00-00+00-00_capitalization_test.eval"
    write_eval_log_file(trial_dir / relative, trial.scores, trial.sample_ids, trial.epochs)
    numeric = [_as_number(v) for v in trial.scores]
    write_record(trial_dir, StageRecord(
        "eval", "eval-key", "done", duration_s=trial.eval_duration_s, outputs=[relative],
        where="local:test:1",
        metrics={"samples": len(numeric), "accuracy": sum(numeric) / max(len(numeric), 1)}))


def _as_number(value: float | str) -> float:
    return {"C": 1.0, "I": 0.0}.get(value, 0.0) if isinstance(value, str) else float(value)


def score_value(value: float | str) -> float | str:
    if isinstance(value, str):
        return value
    if value in (0, 1) and not isinstance(value, bool):
        return "C" if value == 1 else "I"
    return float(value)


def write_eval_log_file(location: Path, scores: Sequence[float | str],
                        sample_ids: Sequence[str] | None = None, epochs: int = 1) -> None:
    """A successful Inspect log with one scored sample per score (per epoch)."""
    from inspect_ai.log import (
        EvalConfig,
        EvalDataset,
        EvalLog,
        EvalMetric,
        EvalResults,
        EvalSample,
        EvalScore,
        EvalSpec,
        write_eval_log,
    )
    from inspect_ai.scorer import Score

    ids = list(sample_ids) if sample_ids is not None else [f"s{i:03d}" for i in range(len(scores))]
    samples = []
    for epoch in range(1, epochs + 1):
        for sample_id, value in zip(ids, scores, strict=True):
            target = sample_id.upper()
            samples.append(EvalSample(
                id=sample_id, epoch=epoch, input=f"Capitalize: {sample_id}", target=target,
                scores={SCORER: Score(value=score_value(value),
                                      answer=target if _as_number(value) == 1 else sample_id)},
            ))
    numeric = [_as_number(v) for v in scores] or [0.0]
    log = EvalLog(
        status="success",
        eval=EvalSpec(created="2026-01-01T00:00:00+00:00", task="capitalization",
                      dataset=EvalDataset(name="words-test", samples=len(ids)),
                      model="hf/test-model", config=EvalConfig(epochs=epochs)),
        results=EvalResults(total_samples=len(samples), completed_samples=len(samples),
                            scores=[EvalScore(name=SCORER, scorer=SCORER, metrics={
                                "accuracy": EvalMetric(name="accuracy",
                                                       value=sum(numeric) / len(numeric))})]),
        samples=samples,
    )
    location.parent.mkdir(parents=True, exist_ok=True)
    write_eval_log(log, str(location))


def record_usage(trial_dir: Path, stage: str, *, usage: dict[str, Any] | None = None,
                 slurm: dict[str, Any] | None = None, outcome: str | None = None,
                 history: list[dict[str, Any]] | None = None) -> None:
    """Give a stage's record chosen compute figures, as the launcher and sacct would leave them
    (`usage` as cruijff.state.Usage's fields, `slurm` as SlurmAccounting's)."""
    from cruijff.state import GpuUse, SlurmAccounting, Usage, read_record

    record = read_record(trial_dir, stage)
    assert record is not None, f"{trial_dir} has no {stage} record"
    if usage is not None:
        gpus = [GpuUse(**g) for g in usage.get("gpus", [])]
        record.usage = Usage(**{**usage, "gpus": gpus})
    if slurm is not None:
        record.slurm = SlurmAccounting(**slurm)
    record.outcome = outcome  # type: ignore[assignment]
    if history is not None:
        record.history = history
    write_record(trial_dir, record)
