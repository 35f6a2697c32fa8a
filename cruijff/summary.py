"""What happened in an experiment, from what is on disk (stage records, logs) and what Slurm
says about the jobs; flows/status.py adds Prefect's view when its server answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cruijff.fileio import json_safe
from cruijff.models import fingerprints_once
from cruijff.runner import DONE_STATES, Experiment, Trial, trial_states, unlocked
from cruijff.slurm import QueuedJob, job_states, slurm_waits
from cruijff.utilization import AttemptUse, attempt_use, earlier_uses


@dataclass
class StageStatus:
    state: str
    """As runner.StageState.state."""
    attempts: int = 0
    duration_s: float | None = None
    where: str | None = None
    slurm: list[str] = field(default_factory=list)
    """'<job id>: <Slurm state>' for each attempt that ran in a Slurm job."""
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    compute: AttemptUse | None = None
    """What the last attempt used beside what it asked for (None: reused, or no record)."""
    compute_earlier: list[AttemptUse] = field(default_factory=list)
    """Earlier attempts that left a figure or an outcome (an OUT_OF_MEMORY before a retry)."""


@dataclass
class TrialStatus:
    id: str
    label: str
    stages: dict[str, StageStatus]
    prefect: str | None = None


@dataclass
class Summary:
    experiment: str
    running: bool
    """A `cruijff run` holds the experiment now."""
    trials: list[TrialStatus]
    notices: list[str] = field(default_factory=list)
    slurm_jobs: list[QueuedJob] = field(default_factory=list)
    """The experiment's worker jobs in Slurm's queue now (state, and why they wait)."""

    @property
    def complete(self) -> bool:
        return all(s.state in DONE_STATES for t in self.trials for s in t.stages.values())

    @property
    def headlines(self) -> list[tuple[str, bool | None]]:
        """The headline metrics the trials' evals recorded (eval.metric, else the first
        scorer's first metric), and whether each is the default: one, normally."""
        return list(dict.fromkeys(
            (s.metrics["headline"], s.metrics.get("headline_default"))
            for t in self.trials for s in t.stages.values()
            if isinstance(s.metrics.get("headline"), str)))

    def headline_text(self) -> str | None:
        """`headline: match/accuracy (headline; default: ...)`, per trial where they differ;
        None before any eval recorded one."""
        from cruijff.stages.eval import describe_headline

        named = self.headlines
        if not named:
            return None
        if len(named) == 1:
            return f"metric: {describe_headline(*named[0])}"
        return "metric: differs between trials (" + "; ".join(
            f"{t.id} {s.metrics['headline']}" for t in self.trials
            for s in t.stages.values() if isinstance(s.metrics.get("headline"), str)) + ")"

    def to_json(self) -> dict[str, Any]:
        return json_safe({"experiment": self.experiment, "running": self.running,
                          "complete": self.complete, "notices": self.notices,
                          "headline": {"text": self.headline_text(), "metrics": [
                              {"metric": name, "default": default}
                              for name, default in self.headlines]},
                          "slurm_jobs": self.slurm_jobs, "trials": self.trials})


def _slurm_jobs(record_where: str | None, history: list[dict]) -> list[str]:
    places = [h.get("where") for h in history] + [record_where]
    return [p.split(":", 1)[1] for p in places if p and p.startswith("slurm:")]


def summarize(experiment: Experiment, selection: list[tuple[Trial, list[str]]]) -> Summary:
    running = not unlocked(experiment)
    with fingerprints_once():
        states = {trial.id: trial_states(trial, stages, held=running)
                  for trial, stages in selection}
    jobs = [j for by_stage in states.values() for s in by_stage.values() if s.record
            for j in _slurm_jobs(s.record.where, s.record.history)]
    slurm = job_states(jobs)
    trials = []
    for trial, _ in selection:
        statuses: dict[str, StageStatus] = {}
        for stage, status in states[trial.id].items():
            record = status.record
            if record is None:
                statuses[stage] = StageStatus(status.state, error=status.detail)
                continue
            statuses[stage] = StageStatus(
                state=status.state, attempts=record.attempts, duration_s=record.duration_s,
                where=record.where if not record.reused_from else f"trial {record.reused_from}",
                slurm=[f"{j}: {slurm.get(j, 'unknown')}"
                       for j in _slurm_jobs(record.where, record.history)],
                error=status.detail or record.error, metrics=record.metrics,
                compute=attempt_use(record), compute_earlier=earlier_uses(record))
        trials.append(TrialStatus(trial.id, trial.label, statuses))
    summary = Summary(experiment.name, running, trials)
    if running or experiment.orchestration.executor == "slurm":
        summary.slurm_jobs, note = slurm_waits(experiment.name)
        if note and not running:  # left by a run that died: they would start for nothing
            note += ("; no run holds the experiment, so cancel them: scancel "
                     + " ".join(j.id for j in summary.slurm_jobs))
        if note:
            summary.notices.append(note)
    return summary


def in_run_order(stage_lists: list[list[str]]) -> list[str]:
    """Every stage named in any of the lists (each a trial's stages, in the order they run),
    in the order stages run: the columns of a table that lists stages. A base-model trial's
    [eval] listed before a fine-tuned trial's [finetune, eval] still puts finetune first."""
    after: dict[str, set[str]] = {}
    for stages in stage_lists:
        for i, stage in enumerate(stages):
            after.setdefault(stage, set()).update(stages[:i])
    order: list[str] = []
    while len(order) < len(after):  # the first-seen stage whose predecessors are all placed
        ready = [s for s in after if s not in order and after[s] <= set(order)]
        order.append(ready[0] if ready else next(s for s in after if s not in order))
    return order
