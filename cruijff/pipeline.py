"""A run, top to bottom: what `cruijff run` runs, in which order, what is shared and retried.

`RunPlan.make` turns the command line into a plan (which trials and stages, on which executor,
with how many workers); `hold` takes the experiment for the run; `run_trial` is one trial's
pipeline, read like a torchtune recipe: skip what is done, reuse a shared stage another trial
runs (waiting for it), run the rest with retries, stop at a failure or a stop request.

Where a stage runs is the one seam, `submit`: `run_in_process` runs stages as subprocesses of
this process (the tests, no orchestrator), cruijff.flows submits each as a Prefect task on a
Dask worker (a thread of a LocalCluster, or a Slurm job).
"""

from __future__ import annotations

import contextvars
import heapq
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cruijff.attempts import FAILED_WAIT_S, grow, settle, settle_late
from cruijff.errors import CruijffError
from cruijff.experiment import BuildRequest, matching_experiment
from cruijff.registry import STAGES
from cruijff.runner import (
    STOP,
    Experiment,
    Trial,
    archive_stages,
    check_writable,
    execute_stage,
    is_done,
    link_shared,
    load_experiment,
    pending,
    record_interrupted,
    run_lock,
    select,
    stage_command,
    stage_key,
    stop_on_signals,
    unfinished_trials,
    unlocked,
)
from cruijff.settings import GrowPolicy
from cruijff.state import StageRecord, read_record

EXECUTORS = ("local", "slurm")

Submit = Callable[[Trial, str, str, int, dict[str, Any] | None], bool]
"""Run one attempt of a stage (trial, stage, key, attempt number, what it asks for beyond the
trial's profile: grow_on_oom's {"mem": GB} or None) somewhere and wait for it; True if its
record now says done."""


@dataclass(frozen=True)
class RunPlan:
    """What one `cruijff run` runs, decided before anything starts."""

    experiment: Experiment
    selection: list[tuple[Trial, list[str]]]
    """(trial, the stages of it to consider), in trial order."""
    executor: str
    force: bool
    """Run the selected stages even if done (their old outputs are archived first)."""
    workers: int
    """Stages at once (local: Dask workers; slurm: per resource profile, at most max_jobs)."""
    threads: int
    """OMP_NUM_THREADS of each local stage: the cores shared out among the workers; 0 on
    Slurm, where the job's own CPUs count."""
    retries: int
    stage: str | None = None
    trials: str | None = None
    """The trial ids as a deployment's parameters carry them ('a,b'), after --failed."""
    note: str | None = None
    """Why nothing is selected (--failed on an experiment without failures)."""

    @classmethod
    def make(cls, path: Path, *, stage: str | None = None, trials: str | None = None,
             failed: bool = False, force: bool = False, executor: str | None = None,
             workers: int | None = None, retries: int | None = None) -> RunPlan:
        if executor not in (None, *EXECUTORS):
            raise CruijffError(f"--executor must be local or slurm, not {executor!r}")
        experiment = load_experiment(path)
        settings = experiment.orchestration
        note = None
        if failed:
            if trials is not None:
                raise CruijffError("--failed picks the trials itself: drop --trials")
            trials = ",".join(t.id for t in unfinished_trials(experiment)) or None
            if trials is None:
                note = f"Experiment {experiment.name} has no failed trials."
        selection = [] if note else select(experiment, trials, stage)
        if not selection and not note:
            raise CruijffError(f"nothing selected: no trial of {experiment.name} has stage "
                               f"{stage!r}")
        for trial, names in selection:  # before anything runs, or --force moves anything
            for name in names:
                stage_command(trial, name)
        executor = executor or settings.executor
        cores = os.cpu_count() or 1
        workers = min(workers or settings.workers or cores, max(1, len(selection)))
        return cls(experiment, selection, executor, force, workers,
                   threads=max(1, cores // workers) if executor == "local" else 0,
                   retries=settings.retries if retries is None else retries,
                   stage=stage, trials=trials, note=note)

    def check_startable(self) -> None:
        """Refuse now, before a server starts or a build is shown as running: the experiment
        is being run, or cannot be written."""
        if not unlocked(self.experiment):
            raise CruijffError(f"experiment {self.experiment.name} is already being run: wait "
                               "for it to finish or stop it first")
        check_writable(self.experiment)

    def todo(self) -> list[tuple[Trial, str]]:
        """The stages this run will execute (or reuse): every selected one with --force,
        else those not done with their current key."""
        if self.force:
            return [(t, s) for t, stages in self.selection for s in stages]
        return pending(self.selection)

    def parameters(self) -> dict[str, Any]:
        """The plan as the experiment flow's (and deployment's) parameters."""
        return {"experiment": str(self.experiment.path), "stage": self.stage,
                "trials": self.trials, "workers": self.workers, "executor": self.executor,
                "force": self.force}


def experiment_to_run(request: BuildRequest, force: bool,
                      build: Callable[[BuildRequest, bool], Path]) -> tuple[Path, bool]:
    """`cruijff run` with build options: (the experiment to run, whether to force its stages).
    One built from the same inputs under that name is continued; otherwise, or with --force,
    `build(request, force)` builds it (again), and a fresh build has nothing to force."""
    existing = None if force else matching_experiment(request)
    if existing is not None:
        return existing, False
    return build(request, force), False


class Sharing:
    """Within one run: of the trials whose shared stage has equal keys, the first (in trial
    order) runs it; the others wait for it to end, then link to its outputs."""

    def __init__(self, selection: list[tuple[Trial, list[str]]]) -> None:
        self.owners: dict[tuple[str, str], str] = {}
        for trial, stages in selection:
            for stage in stages:
                if STAGES[stage].shared:
                    self.owners.setdefault((stage, stage_key(trial, stage)), trial.id)
        self.ended = {claim: threading.Event() for claim in self.owners}
        self.order = {trial.id: index for index, (trial, _) in enumerate(selection)}
        self.places: Places | None = None
        """The run's places (`run_concurrently` sets them): a waiting trial gives its up."""

    def donor(self, experiment: Experiment, trial: Trial, stage: str, key: str) -> Trial | None:
        """The trial whose finished run `trial` can reuse, after waiting for the owner if
        another trial runs it in this run (its place given up meanwhile: a waiting trial
        holds no worker); None if `trial` must run it (owner, owner failed)."""
        owner = self.owners.get((stage, key))
        ended = self.ended.get((stage, key))
        if owner is not None and owner != trial.id and ended is not None and not ended.is_set():
            if self.places is None:
                ended.wait()
            else:
                with self.places.aside(self.order[trial.id]):
                    ended.wait()
        for other in experiment.trials:
            if other.id != trial.id and stage in other.stages and is_done(other, stage, key):
                record = read_record(other.dir, stage)
                if record is not None and record.reused_from is None:
                    return other
        return None

    def release(self, trial: Trial, stage: str, key: str) -> None:
        """`trial` is done trying a stage: if it owned the run, its waiters may go on."""
        if self.owners.get((stage, key)) == trial.id:
            self.ended[(stage, key)].set()

    def release_all(self, trial: Trial) -> None:
        """`trial`'s pipeline ended: whatever it owned but never reached (a failure or a stop
        before it) no longer holds its waiters."""
        for claim, owner in self.owners.items():
            if owner == trial.id:
                self.ended[claim].set()


UNSTARTED_RESUBMITS = 5
"""How often a stage lost before it started (its worker died while it waited there) is
submitted again without counting as an attempt."""


def run_with_retries(trial: Trial, stage: str, key: str, submit: Submit, retries: int,
                     stop: threading.Event = STOP, grow_on_oom: GrowPolicy | None = None,
                     say: Callable[[str], None] = print,
                     report: Callable[[StageRecord], None] | None = None) -> bool:
    """Submit the stage, and again after a failure, up to `retries` times; True once done.
    The retry loop lives here, not in Prefect's task engine, because that engine runs on the
    worker: when a worker is lost (a cancelled or timed-out Slurm job) its retries go too.
    Only an attempt that started counts: a stage that was waiting on a worker lost to another
    stage's fault (Dask queues a task on a busy worker) is submitted again for free. After each
    attempt that ran in a Slurm job, the scheduler's view of it is added to its record; one
    that ran out of memory is retried with more if `grow_on_oom` says so (said in one line);
    `report` is shown each such settled record (the orchestrator's view of the attempt). A
    deterministic failure (its record's `failure`: an import error, a missing split, bad task
    arguments) is not retried, which is said in one line: it would fail the same way."""
    attempt = unstarted = 0
    grown: dict[str, Any] | None = None
    while attempt <= retries:
        before = _run_id(trial, stage)
        done = submit(trial, stage, key, attempt + 1, grown)
        if stop.is_set():  # an attempt that finished before the stop counts: no rerun
            return done
        if _run_id(trial, stage) == before and not done and unstarted < UNSTARTED_RESUBMITS:
            unstarted += 1
            continue
        record = settle(trial, stage, wait_s=0.0 if done else FAILED_WAIT_S, grown=grown)
        if report is not None and record is not None and record.slurm is not None:
            report(record)
        if done:
            return True
        attempt += 1
        if attempt <= retries and record is not None and record.deterministic:
            why = record.failure_reason or "it would fail the same way again"
            say(f"trial {trial.id} {stage}: not retried: {why} (deterministic)")
            return False
        if attempt <= retries:
            grown, line = grow(record, grow_on_oom, grown, trial)
            if line:
                say(line)
    return False


def _run_id(trial: Trial, stage: str) -> str | None:
    """The stage's latest execution (each writes a record with a new run id as it starts)."""
    record = read_record(trial.dir, stage)
    return None if record is None else record.run_id


def run_trial(experiment: Experiment, trial: Trial, stages: list[str], submit: Submit, *,
              sharing: Sharing, retries: int, stop: threading.Event = STOP,
              report: Callable[[StageRecord], None] | None = None) -> dict[str, str]:
    """One trial's pipeline: stage -> skipped (done with its current key), reused (another
    trial's run of a shared stage), done, or failed (the later stages do not run). Stops
    starting stages once `stop` is set."""
    outcome: dict[str, str] = {}
    try:
        for stage in stages:
            if stop.is_set():
                break
            key = stage_key(trial, stage)
            if is_done(trial, stage, key):  # run by hand, or before: its waiters go on
                sharing.release(trial, stage, key)
                outcome[stage] = "skipped"
                continue
            if STAGES[stage].shared:
                donor = sharing.donor(experiment, trial, stage, key)
                if donor is not None:
                    link_shared(trial, donor, stage)
                    outcome[stage] = "reused"
                    continue
            try:
                done = run_with_retries(trial, stage, key, submit, retries, stop,
                                        experiment.orchestration.grow_on_oom, report=report)
            finally:
                sharing.release(trial, stage, key)
            outcome[stage] = "done" if done else "failed"
            if not done:
                break
    finally:
        sharing.release_all(trial)
    return outcome


def trial_ending(outcome: dict[str, str], stages: list[str],
                 stop: threading.Event = STOP) -> str:
    """How a trial's pipeline ended: completed (every stage done, skipped or reused, even if
    the user stopped the run right after), stopped, or failed."""
    if len(outcome) == len(stages) and "failed" not in outcome.values():
        return "completed"
    return "stopped" if stop.is_set() else "failed"


@contextmanager
def hold(plan: RunPlan) -> Iterator[Sharing]:
    """The experiment, held for this run: its run lock, Ctrl-C/SIGTERM as a clean stop, the
    old outputs of --force's stages archived; yields who runs each shared stage. Exit it
    after the run's workers are gone: a stopped run's stages are then recorded interrupted."""
    with run_lock(plan.experiment), stop_on_signals():
        if plan.force:
            archive_stages(plan.experiment, plan.selection)
        try:
            yield Sharing(plan.selection)
        finally:  # the run's workers are gone: what they left half-recorded is settled here
            record_interrupted(plan.selection)
            settle_late(plan.selection)


T = TypeVar("T")


class Places:
    """The trials that may have work in flight at once (a stage running, or queued for a
    worker). A trial waiting for another's shared stage steps aside, giving its place up,
    so runnable work never queues behind waiting: an eval-only trial, or the second unique
    fine-tune, starts beside the first. A freed place goes first to a trial coming back
    from such a wait (it is further along), then to the next trial in order."""

    RETURNING, NEW = 0, 1

    def __init__(self, count: int, stop: threading.Event = STOP) -> None:
        self._free = max(1, count)
        self._queue: list[tuple[int, int]] = []
        self._changed = threading.Condition()
        self._stop = stop

    def take(self, rank: tuple[int, int]) -> None:
        """Wait for a place, in rank order (returning trials first, then trial order);
        at once when the run is stopping (the trial then starts nothing)."""
        with self._changed:
            heapq.heappush(self._queue, rank)
            # The timeout only bounds how late a stop request is seen while waiting.
            while not (self._free > 0 and self._queue[0] == rank) and not self._stop.is_set():
                self._changed.wait(timeout=0.5)
            self._queue.remove(rank)
            heapq.heapify(self._queue)
            self._free -= 1
            self._changed.notify_all()

    def give(self) -> None:
        with self._changed:
            self._free += 1
            self._changed.notify_all()

    @contextmanager
    def aside(self, index: int) -> Iterator[None]:
        """The trial at `index` waits without its place; it takes one again to go on."""
        self.give()
        try:
            yield
        finally:
            self.take((self.RETURNING, index))


def run_concurrently(selection: list[tuple[Trial, list[str]]],
                     start: Callable[[Trial, list[str]], T], at_once: int,
                     sharing: Sharing | None = None) -> dict[str, T]:
    """start(trial, stages) for every selected trial, in trial order, at most `at_once` with
    work in flight (`Places`: one waiting for a shared stage gives its place up); trial id ->
    what it returned. Each runs in a thread, in a copy of this thread's context (an
    orchestrator's run context goes along); a trial has a thread only once it has a place."""
    places = Places(at_once)
    if sharing is not None:
        sharing.places = places

    def run(trial: Trial, stages: list[str]) -> T:
        try:
            return start(trial, stages)
        finally:
            places.give()

    with ThreadPoolExecutor(max_workers=max(1, len(selection))) as pool:
        futures = {}
        for index, (trial, stages) in enumerate(selection):
            places.take((Places.NEW, index))
            futures[trial.id] = pool.submit(contextvars.copy_context().run, run, trial, stages)
        return {trial_id: future.result() for trial_id, future in futures.items()}


def run_in_process(plan: RunPlan) -> dict[str, dict[str, str]]:
    """Run the plan with no orchestrator: each trial's pipeline in a thread, its stages as
    subprocesses of this process: plan.workers trials at once hold a place, so at most that
    many stages run. Trial id -> stage outcomes."""

    def submit(trial: Trial, stage: str, key: str, attempt: int,
               grown: dict[str, Any] | None) -> bool:
        if STOP.is_set():
            return False
        return execute_stage(trial, stage, key, threads=plan.threads).is_done

    with hold(plan) as sharing:
        return run_concurrently(
            plan.selection,
            lambda trial, stages: run_trial(plan.experiment, trial, stages, submit,
                                            sharing=sharing, retries=plan.retries),
            at_once=plan.workers, sharing=sharing)
