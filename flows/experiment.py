"""Prefect: an experiment flow, one subflow per trial, one task per stage, tasks on Dask.

Thin by design: what to run and how is decided in cruijff.runner; this file only maps it onto
Prefect runs (history, retries, tags, the UI) and Dask workers (where the stage commands run).
"""

from __future__ import annotations

import contextvars
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cruijff.flows.clusters import clusters, wait_for_stage
from prefect import flow, tags, task
from prefect.exceptions import PrefectHTTPStatusError
from prefect.states import Cancelled, State
from prefect_dask import DaskTaskRunner

from cruijff.errors import CruijffError
from cruijff.runner import (
    SHARED_STAGES,
    STOP,
    STOP_GRACE_S,
    Experiment,
    Trial,
    archive_stages,
    execute_stage,
    is_done,
    link_shared,
    load_experiment,
    run_lock,
    select,
    stage_key,
    stop_on_signals,
    summarize,
)
from cruijff.slurm import SlurmSubmitError
from cruijff.state import read_record


class StageFailedError(CruijffError):
    """Raised in a stage task so that Prefect records the failure (the console shows cruijff's
    results table instead of a traceback; the Prefect UI keeps the full record)."""


class _SharedStages:
    """Within one run: of the trials that need a shared stage with equal keys, the first (in
    trial order) runs it; the others wait for it and then link to its outputs."""

    def __init__(self, selection: list[tuple[Trial, list[str]]]) -> None:
        self.owners: dict[tuple[str, str], str] = {}
        for trial, stages in selection:
            for stage in stages:
                if stage in SHARED_STAGES:
                    self.owners.setdefault((stage, stage_key(trial, stage)), trial.id)
        self.finished = {claim: threading.Event() for claim in self.owners}


_RUNS: dict[str, _SharedStages] = {}

SERVER_BUSY_PAUSES_S = (10.0, 30.0)


def _start_trial(subflow: Any, *args: Any) -> str:
    """Run a trial's subflow; its final state's type. A trial the Prefect server refused as busy
    (HTTP 503 after the client's own retries: a SQLite-backed server under load) starts again
    after each of SERVER_BUSY_PAUSES_S; its finished stages are skipped, so nothing runs twice."""
    for pause in SERVER_BUSY_PAUSES_S:
        try:
            return subflow(*args, return_state=True).type.value
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != 503 or STOP.wait(pause):
                raise
    return subflow(*args, return_state=True).type.value


def _run_stage(experiment: str, trial_id: str, stage: str, key: str, threads: int) -> dict:
    trial = load_experiment(Path(experiment)).trial(trial_id)
    try:
        record = execute_stage(trial, stage, key, threads=threads)
    except OSError as exc:  # a full disk, a folder made read-only mid-run
        raise StageFailedError(f"{stage} of trial {trial_id} could not write its log or "
                               f"record: {exc}") from None
    if record.status != "done":
        raise StageFailedError(f"{stage} of trial {trial_id} failed: {record.error}")
    return summarize(record)


# Tasks and flows here are decorated by call, not with @: Prefect ships the current flow and
# task to Dask workers, and a function whose module name points at its decorated object is
# pickled by value with the globals it reaches (here a registry holding locks). Decorated
# this way, workers import it by name.
run_stage = task(name="stage")(_run_stage)


def _shared_donor(exp: Experiment, trial: Trial, stage: str, key: str,
                  shared: _SharedStages) -> Trial | None:
    """The trial whose finished run of this shared stage `trial` can reuse, waiting for the
    owner if another trial runs it now; None if `trial` must run it (owner, or owner failed)."""
    owner = shared.owners.get((stage, key))
    if owner is not None and owner != trial.id:
        shared.finished[(stage, key)].wait()
    for other in exp.trials:
        if other.id != trial.id and stage in other.stages and is_done(other, stage, key):
            record = read_record(other.dir, stage)
            if record is not None and record.reused_from is None:
                return other
    return None


def _run_with_retries(experiment: str, trial: Trial, stage: str, key: str, threads: int,
                      retries: int) -> bool:
    """Submit the stage, and again after a failure, up to `retries` times. The retry loop
    lives here, not in Prefect's task engine, because that engine runs on the worker: when a
    worker is lost (a cancelled or timed-out Slurm job) its retries are lost with it."""
    for attempt in range(1, retries + 2):
        future = run_stage.with_options(
            task_run_name=f"trial-{trial.id}-{stage}" + (f"-retry{attempt - 1}" if attempt > 1
                                                         else ""),
            tags=[f"stage:{stage}"],
        ).submit(experiment, trial.id, stage, key, threads)
        wait_for_stage(future, experiment, stop=STOP)  # raises if no Slurm job can be submitted
        if STOP.is_set():
            # A local stage was just stopped and records that; a Slurm stage ends with its
            # worker job, which closing the run's clusters cancels.
            future.wait(timeout=STOP_GRACE_S + 5)
            return False
        if future.state.is_completed():
            return True
    return False


def _trial(experiment: str, trial_id: str, stages: list[str], run_id: str,
           threads: int = 1, retries: int = 1) -> dict[str, str] | State:
    """One trial's pipeline: each stage runs only if it is not done with its current key."""
    exp = load_experiment(Path(experiment))
    trial = exp.trial(trial_id)
    shared = _RUNS[run_id]
    outcome: dict[str, str] = {}
    for stage in stages:
        if STOP.is_set():
            break
        key = stage_key(trial, stage)
        if is_done(trial, stage, key):
            outcome[stage] = "skipped"
            continue
        if stage in SHARED_STAGES:
            donor = _shared_donor(exp, trial, stage, key, shared)
            if donor is not None:
                link_shared(trial, donor, stage)
                outcome[stage] = "reused"
                continue
        try:
            ok = _run_with_retries(experiment, trial, stage, key, threads, retries)
        finally:
            if shared.owners.get((stage, key)) == trial.id:
                shared.finished[(stage, key)].set()
        if not ok:
            outcome[stage] = "failed"
            break
        outcome[stage] = "done"
    if STOP.is_set():
        return Cancelled(message=f"stopped by the user; done: {outcome}")
    if "failed" in outcome.values():
        raise StageFailedError(f"trial {trial_id}: {outcome}")
    return outcome


trial_flow = flow(name="cruijff-trial")(_trial)


def _experiment(experiment: str, stage: str | None = None, trials: str | None = None,
                workers: int | None = None, retries: int | None = None,
                executor: str | None = None, force: bool = False) -> dict[str, str] | State:
    """All selected trials as concurrent subflows, their stages on Dask workers: threads of
    a LocalCluster, or Slurm jobs of one SLURMCluster per resource profile."""
    exp = load_experiment(Path(experiment))
    selection = select(exp, trials, stage)
    settings = exp.orchestration
    executor = executor or settings.executor
    retries = settings.retries if retries is None else retries
    cores = os.cpu_count() or 1
    workers = min(workers or settings.workers or cores, max(1, len(selection)))
    threads = max(1, cores // workers) if executor == "local" else 0
    run_id = uuid.uuid4().hex
    states: dict[str, str] = {}
    if executor == "slurm":
        import dask_jobqueue  # noqa: F401  # its import sets a SIGINT handler: let ours win
    with run_lock(exp), tags("cruijff", f"exp:{exp.name}"), stop_on_signals():
        if force:
            archive_stages(exp, selection)
        _RUNS[run_id] = _SharedStages(selection)
        try:
            with clusters(exp, [t for t, _ in selection], executor=executor, workers=workers,
                          max_jobs=settings.max_jobs) as addresses:

                def run_trial(trial: Trial, stages: list[str]) -> str:
                    with tags(f"trial:{trial.id}"):
                        subflow = trial_flow.with_options(
                            flow_run_name=f"{exp.name}/trial-{trial.id}",
                            task_runner=DaskTaskRunner(address=addresses[trial.id]),
                        )
                        return _start_trial(subflow, experiment, trial.id, stages, run_id,
                                            threads, retries)

                # Trials beyond what the workers can run wait here, not as live subflows: 200
                # subflows at once overwhelm a SQLite-backed Prefect server (HTTP 503).
                slots = len(set(addresses.values())) * (
                    workers if executor == "local" else settings.max_jobs)
                with ThreadPoolExecutor(max_workers=max(1, min(len(selection), 2 * slots))
                                        ) as pool:
                    futures = {
                        trial.id: pool.submit(contextvars.copy_context().run, run_trial, trial,
                                              stages)
                        for trial, stages in selection
                    }
                    states = {trial_id: f.result() for trial_id, f in futures.items()}
        finally:
            _RUNS.pop(run_id, None)
    if STOP.is_set():
        return Cancelled(message="stopped by the user (Ctrl-C or SIGTERM): `cruijff run` "
                         "resumes the experiment")
    failed = [t for t, s in states.items() if s != "COMPLETED"]
    if failed:
        raise StageFailedError(f"trials failed: {', '.join(failed)}")
    return states


experiment_flow = flow(name="cruijff-experiment")(_experiment)


def run_experiment(experiment: Path, *, stage: str | None = None, trials: str | None = None,
                   workers: int | None = None, executor: str | None = None,
                   force: bool = False) -> bool:
    """Run the experiment flow in this process; True if every selected stage succeeded."""
    name = load_experiment(experiment).name
    with tags("cruijff", f"exp:{name}"):
        state = experiment_flow.with_options(flow_run_name=name)(
            str(experiment), stage, trials, workers, None, executor, force, return_state=True
        )
    if state.is_failed():
        error = state.result(raise_on_failure=False)
        if isinstance(error, SlurmSubmitError):
            raise error  # the CLI's one line (exit 2): no job could be submitted
    return state.is_completed()
