"""Prefect: an experiment flow, one subflow per trial, one task per stage, tasks on Dask.

Thin by design: what to run and how is decided in cruijff.runner; this file only maps it onto
Prefect runs (history, retries, tags, the UI) and Dask workers (where the stage commands run).
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distributed import LocalCluster
from prefect import flow, tags, task
from prefect_dask import DaskTaskRunner

from cruijff.runner import (
    SHARED_STAGES,
    Experiment,
    Trial,
    execute_stage,
    is_done,
    link_shared,
    load_experiment,
    select,
    stage_key,
    summarize,
)
from cruijff.state import read_record


class StageFailedError(RuntimeError):
    """Raised in a stage task so that Prefect records the failure and retries it."""


class _SharedStages:
    """Within one run: the first trial to need a shared stage with a given key runs it;
    trials with the same key wait for it and then link to its outputs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[tuple[str, str], tuple[str, threading.Event]] = {}

    def claim(self, stage: str, key: str, trial_id: str) -> tuple[str, threading.Event]:
        with self._lock:
            return self._claims.setdefault((stage, key), (trial_id, threading.Event()))


_RUNS: dict[str, _SharedStages] = {}


def _run_stage(experiment: str, trial_id: str, stage: str, key: str, threads: int) -> dict:
    trial = load_experiment(Path(experiment)).trial(trial_id)
    record = execute_stage(trial, stage, key, threads=threads)
    if record.status != "done":
        raise StageFailedError(f"{stage} of trial {trial_id} failed: {record.error}")
    return summarize(record)


# Tasks and flows here are decorated by call, not with @: Prefect ships the current flow and
# task to Dask workers, and a function whose module name points at its decorated object is
# pickled by value with the globals it reaches (here a registry holding locks). Decorated
# this way, workers import it by name.
run_stage = task(name="stage")(_run_stage)


def _done_elsewhere(experiment: Experiment, stage: str, key: str) -> Trial | None:
    for other in experiment.trials:
        if stage in other.stages and is_done(other, stage, key):
            record = read_record(other.dir, stage)
            if record is not None and record.reused_from is None:
                return other
    return None


def _trial(experiment: str, trial_id: str, stages: list[str], run_id: str,
               threads: int = 1, retries: int = 1) -> dict[str, str]:
    """One trial's pipeline: each stage runs only if it is not done with its current key."""
    exp = load_experiment(Path(experiment))
    trial = exp.trial(trial_id)
    outcome: dict[str, str] = {}
    for stage in stages:
        key = stage_key(trial, stage)
        if is_done(trial, stage, key):
            outcome[stage] = "skipped"
            continue
        event = None
        if stage in SHARED_STAGES:
            donor = _done_elsewhere(exp, stage, key)
            if donor is None:
                owner, event = _RUNS[run_id].claim(stage, key, trial.id)
                if owner != trial.id:
                    event.wait()
                    donor = _done_elsewhere(exp, stage, key)
                    if donor is None:
                        outcome[stage] = "failed"
                        break
            if donor is not None and donor.id != trial.id:
                link_shared(trial, donor, stage)
                outcome[stage] = "reused"
                continue
        future = run_stage.with_options(
            task_run_name=f"trial-{trial.id}-{stage}", retries=retries, tags=[f"stage:{stage}"]
        ).submit(experiment, trial.id, stage, key, threads)
        future.wait()
        if event is not None:
            event.set()
        if not future.state.is_completed():
            outcome[stage] = "failed"
            break
        outcome[stage] = "done"
    if "failed" in outcome.values():
        raise StageFailedError(f"trial {trial_id}: {outcome}")
    return outcome


trial_flow = flow(name="cruijff-trial")(_trial)


def _experiment(experiment: str, stage: str | None = None, trials: str | None = None,
                    workers: int | None = None, retries: int = 1) -> dict[str, str]:
    """All selected trials as concurrent subflows, their stages on a Dask LocalCluster."""
    exp = load_experiment(Path(experiment))
    selection = select(exp, trials, stage)
    cores = os.cpu_count() or 1
    workers = min(workers or cores, max(1, len(selection)))
    threads = max(1, cores // workers)
    run_id = uuid.uuid4().hex
    _RUNS[run_id] = _SharedStages()
    states: dict[str, str] = {}
    try:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=logging.ERROR) as cluster:

            def run_trial(trial: Trial, stages: list[str]) -> str:
                with tags(f"trial:{trial.id}"):
                    subflow = trial_flow.with_options(
                        flow_run_name=f"{exp.name}/trial-{trial.id}",
                        task_runner=DaskTaskRunner(address=cluster.scheduler_address),
                    )
                    state = subflow(experiment, trial.id, stages, run_id, threads, retries,
                                    return_state=True)
                    return state.type.value

            with ThreadPoolExecutor(max_workers=len(selection) or 1) as pool:
                futures = {
                    trial.id: pool.submit(contextvars.copy_context().run, run_trial, trial, stages)
                    for trial, stages in selection
                }
                states = {trial_id: f.result() for trial_id, f in futures.items()}
    finally:
        _RUNS.pop(run_id, None)
    failed = [t for t, s in states.items() if s != "COMPLETED"]
    if failed:
        raise StageFailedError(f"trials failed: {', '.join(failed)}")
    return states


experiment_flow = flow(name="cruijff-experiment")(_experiment)


def run_experiment(experiment: Path, *, stage: str | None = None, trials: str | None = None,
                   workers: int | None = None, retries: int = 1) -> bool:
    """Run the experiment flow in this process; True if every selected stage succeeded."""
    name = load_experiment(experiment).name
    with tags("cruijff", f"exp:{name}"):
        state = experiment_flow.with_options(flow_run_name=name)(
            str(experiment), stage, trials, workers, retries, return_state=True
        )
    return state.is_completed()
