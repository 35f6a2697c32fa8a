"""What happened in an experiment, from what is on disk (stage records, logs) and what Slurm
says about the jobs; flows/status.py adds Prefect's view when its server answers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cruijff.fileio import json_safe
from cruijff.runner import Experiment, Trial, stage_key, unlocked
from cruijff.slurm import QueuedJob, job_states, slurm_waits
from cruijff.state import damaged_output, read_record


@dataclass
class StageStatus:
    state: str
    """done, reused, outdated (done, but its inputs changed since: it will run again),
    damaged (done, but an output file is gone or truncated since: it will run again),
    failed, running, interrupted, pending, blocked (an earlier stage failed)."""
    attempts: int = 0
    duration_s: float | None = None
    where: str | None = None
    slurm: list[str] = field(default_factory=list)
    """'<job id>: <Slurm state>' for each attempt that ran in a Slurm job."""
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


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
        return all(s.state in ("done", "reused") for t in self.trials for s in t.stages.values())


    def to_json(self) -> dict[str, Any]:
        return json_safe({"experiment": self.experiment, "running": self.running,
                          "complete": self.complete, "notices": self.notices,
                          "slurm_jobs": [asdict(j) for j in self.slurm_jobs],
                          "trials": [asdict(t) for t in self.trials]})


def _slurm_jobs(record_where: str | None, history: list[dict]) -> list[str]:
    places = [h.get("where") for h in history] + [record_where]
    return [p.split(":", 1)[1] for p in places if p and p.startswith("slurm:")]


def summarize(experiment: Experiment, selection: list[tuple[Trial, list[str]]]) -> Summary:
    running = not unlocked(experiment)
    records = {(t.id, s): read_record(t.dir, s) for t, stages in selection for s in stages}
    jobs = [j for r in records.values() if r for j in _slurm_jobs(r.where, r.history)]
    slurm = job_states(jobs)
    trials = []
    for trial, stages in selection:
        statuses: dict[str, StageStatus] = {}
        blocked = rerun = False  # an earlier stage failed / will run again
        for stage in stages:
            record = records[(trial.id, stage)]
            if record is None:
                statuses[stage] = StageStatus("blocked" if blocked else "pending")
                continue
            state = record.status
            if state == "running" and not running:
                state = "interrupted"  # no run holds the experiment: nothing is running it
            elif record.is_done and (rerun or record.key != stage_key(trial, stage)):
                state = "outdated"
            elif record.is_done and (damage := damaged_output(trial.dir, record)):
                state = "damaged"  # its outputs changed after it was verified: it runs again
                record.error = damage
            statuses[stage] = StageStatus(
                state=state, attempts=record.attempts, duration_s=record.duration_s,
                where=record.where if not record.reused_from else f"trial {record.reused_from}",
                slurm=[f"{j}: {slurm.get(j, 'unknown')}"
                       for j in _slurm_jobs(record.where, record.history)],
                error=record.error, metrics=record.metrics)
            blocked = blocked or state in ("failed", "interrupted")
            rerun = rerun or state in ("outdated", "damaged")
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
