"""One stage of one trial run by hand (`sbatch trial-a/finetune.slurm`, which calls
`python -m cruijff stage <trial> <stage>`), through the calls `cruijff run` makes for a stage:
the same key (runner.stage_key), skip when done, a shared stage's reuse, `execute_stage`
(command, log, verification, failure class, the record) and, in a Slurm job, `settle` (sacct's
view, OUT_OF_MEMORY/TIMEOUT). So a stage run by hand and one run by `cruijff run` are
interchangeable: `summary` counts either, and `run` skips either.

Locks: `cruijff run` holds the experiment's run lock exclusively; a stage by hand holds it
shared (several trials' stages may run by hand at once, but not beside a run, which would run
them too) and the stage's own lock exclusively (one execution of a stage at a time).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cruijff.attempts import FAILED_WAIT_S, settle
from cruijff.errors import CruijffError
from cruijff.experiment import trial_stage_profile
from cruijff.pipeline import Sharing
from cruijff.registry import STAGES, file_stem
from cruijff.runner import (
    Experiment,
    Trial,
    execute_stage,
    is_done,
    link_shared,
    load_experiment,
    stage_key,
    stop_on_signals,
    trial_states,
)
from cruijff.state import RECORDS, StageRecord, now, read_record, stage_lock_path


def find_trial(trial_dir: Path) -> tuple[Experiment, Trial]:
    """The experiment and trial of a trial folder (`<experiment>/trial-<id>`)."""
    folder = Path(trial_dir).expanduser().resolve()
    experiment = load_experiment(folder.parent)
    for trial in experiment.trials:
        if trial.dir == folder:
            return experiment, trial
    raise CruijffError(f"{folder} is no trial folder of experiment {experiment.name} "
                       f"(its trials: {', '.join(t.dir.name for t in experiment.trials)})")


def _holder() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    return json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": now(),
                       **({"slurm_job": job} if job else {})})


@contextmanager
def _locked(path: Path, shared: bool, refusal: Callable[[str], str]) -> Iterator[None]:
    """An flock on `path` (shared or exclusive), or CruijffError(refusal(holder)) at once if
    it is held the other way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise CruijffError(refusal(handle.read().strip() or "another process")) from None
        if not shared:
            handle.seek(0)
            handle.truncate()
            handle.write(_holder())
            handle.flush()
        try:
            yield
        finally:
            if not shared:
                handle.seek(0)
                handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_stage(trial_dir: Path, stage: str,
              say: Callable[[str], None] = print) -> StageRecord | None:
    """Run one stage of a trial as `cruijff run` would, and return its record (done, reused,
    failed or interrupted). CruijffError (one line) when the stage is not the trial's, an
    earlier stage is not done, a run holds the experiment or the stage runs elsewhere."""
    experiment, trial = find_trial(trial_dir)
    STAGES[stage]  # an unknown stage: one line naming the stages
    if stage not in trial.stages:
        raise CruijffError(f"trial {trial.id} does not run stage {stage!r} (its stages: "
                           f"{', '.join(trial.stages)})")
    run_lock = experiment.path / RECORDS / "run.lock"
    with _locked(run_lock, True, lambda holder: (
            f"experiment {experiment.name} is being run by `cruijff run` ({holder}), which "
            "runs its stages itself: wait for it to finish or stop it first")), \
            _locked(stage_lock_path(trial.dir, stage), False, lambda holder: (
                f"trial {trial.id} {stage} is already running by hand ({holder}): wait for "
                "it to end")), \
            stop_on_signals():
        return _run(experiment, trial, stage, say)


def _run(experiment: Experiment, trial: Trial, stage: str,
         say: Callable[[str], None]) -> StageRecord | None:
    earlier = trial.stages[: trial.stages.index(stage)]
    for name, state in trial_states(trial, earlier, held=True).items():
        if not state.is_done:
            raise CruijffError(
                f"trial {trial.id} {stage} needs {name} done first (it is {state.state}): "
                f"submit {trial.dir / file_stem(name)}.slurm, or `cruijff run "
                f"{experiment.path} --trials {trial.id}`")
    key = stage_key(trial, stage)
    if is_done(trial, stage, key):
        say(f"trial {trial.id} {stage} is already done with its current inputs: nothing to "
            f"run (`cruijff run {experiment.path} --trials {trial.id} --stage {stage} "
            "--force` runs it again)")
        return read_record(trial.dir, stage)
    if STAGES[stage].shared:
        donor = Sharing([]).donor(experiment, trial, stage, key)
        if donor is not None:
            say(f"trial {trial.id} {stage}: reused trial {donor.id}'s run (equal inputs)")
            return link_shared(trial, donor, stage)
    in_job = bool(os.environ.get("SLURM_JOB_ID"))
    if in_job:  # as in `cruijff run`'s worker jobs: the attempt is its own job step
        os.environ.setdefault("CRUIJFF_STAGE_STEP", "1")
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    threads = (int(cpus) if cpus.isdigit() else 1) if in_job else None
    record = execute_stage(trial, stage, key, threads=threads)
    # sacct's view of the attempt, against what this script's job asked for (its stage's
    # profile, where a worker job asks for the most any of the trial's stages does)
    asked = trial_stage_profile(trial.dir, stage).requests() if in_job else None
    return settle(trial, stage, wait_s=0.0 if record.is_done else FAILED_WAIT_S,
                  grown=asked) or record


def outcome_line(trial: str, record: StageRecord) -> str:
    """One line on a stage run by hand that did not end done: its state, failure class and
    reason, and its log."""
    why = record.failure_reason or (record.error or "").split("\n", 1)[0] or "no reason given"
    kind = f" ({record.failure})" if record.failure else ""
    log = f"; log: {record.log}" if record.log else ""
    return f"trial {trial} {record.stage} {record.status}{kind}: {why}{log}"
