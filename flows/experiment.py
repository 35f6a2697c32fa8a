"""Prefect: an experiment flow, one subflow per trial, one task per stage, tasks on Dask.

Thin by design: what runs, in which order, shared or retried is decided in cruijff.pipeline;
this file only maps it onto Prefect runs (history, tags, names, the UI) and Dask workers
(where the stage commands run), and copes with a busy Prefect server.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
from cruijff.flows.artifacts import publish
from cruijff.flows.clusters import STAGE_SLOT, Endpoints, clusters, wait_for_stage
from cruijff.flows.stage_logs import show_attempt_log, show_latest_log
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import Cancelled, State
from prefect_dask import DaskTaskRunner

from cruijff.errors import CruijffError
from cruijff.pipeline import (
    RunPlan,
    Sharing,
    hold,
    run_concurrently,
    run_trial,
    trial_ending,
)
from cruijff.runner import STOP, STOP_GRACE_S, Trial, execute_stage, load_experiment, summarize
from cruijff.slurm import SlurmSubmitError
from cruijff.state import StageRecord, read_record
from cruijff.utilization import attempt_use, use_line, use_row


class StageFailedError(CruijffError):
    """Raised in a stage task so that Prefect records the failure (the console shows cruijff's
    results table instead of a traceback; the Prefect UI keeps the full record)."""


_RUNS: dict[str, Sharing] = {}
"""The sharing table of each run in this process, by run id: trial subflows take parameters
Prefect can store, so they look theirs up here."""
_ENDPOINTS: dict[str, Endpoints] = {}
"""The clusters of each run in this process, by run id (as _RUNS)."""

SERVER_BUSY_PAUSES_S = (10.0, 30.0)


@contextmanager
def no_heartbeats() -> Iterator[None]:
    """Prefect's flow-run heartbeats off for the flow runs started inside, unless the user set
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY. A finishing flow run waits for its heartbeat thread,
    which sleeps in 1 s steps (0.5 s on average, for every trial's subflow and again for the
    experiment's: most of a run's tail); cruijff finds runs whose process died by its own run
    lock (flows/status.py), not by missing heartbeats."""
    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in os.environ:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


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


def artifact_key(experiment: str, trial_id: str, stage: str) -> str:
    """`compute-<experiment>-<trial>-<stage>` as Prefect keys must be: lowercase letters,
    digits and dashes (each attempt is a new version of the stage's artifact)."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{experiment}-{trial_id}-{stage}".lower()).strip("-")
    return f"compute-{slug[:150]}"


def _show_use(experiment: str, trial_id: str, record: StageRecord) -> None:
    """What the attempt used, as one line in the task run's log and a one-row table artifact.
    Only a view: a Prefect error (a busy server's HTTP 503) is logged, never fails the stage."""
    use = attempt_use(record)
    if use is None:
        return
    try:
        logger = get_run_logger()
        logger.info("trial %s %s used: %s", trial_id, record.stage, use_line(use))
    except Exception:  # no run context (called outside a task run): nothing to log to
        return
    if STOP.is_set():  # stopping: no call that a busy server could hold up
        return
    try:
        create_table_artifact([use_row(trial_id, record.stage, use)],
                              key=artifact_key(experiment, trial_id, record.stage),
                              description=f"What trial {trial_id} {record.stage} attempt "
                              f"{record.attempts} used, and what its job asked for")
    except Exception as exc:
        logger.warning("no compute artifact for trial %s %s: %s", trial_id, record.stage,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def _run_stage(experiment: str, trial_id: str, stage: str, key: str, threads: int,
               grown: dict[str, Any] | None = None) -> dict:
    exp = load_experiment(Path(experiment))
    trial = exp.trial(trial_id)
    before = read_record(trial.dir, stage)
    try:
        record = execute_stage(trial, stage, key, threads=threads, grown=grown)
    except OSError as exc:  # a full disk, a folder made read-only mid-run
        show_latest_log(trial.dir, stage, before)
        raise StageFailedError(f"{stage} of trial {trial_id} could not write its log or "
                               f"record: {exc}") from None
    show_attempt_log(trial.dir, record)  # the task run's log pane: how the attempt went
    _show_use(exp.name, trial_id, record)
    if record.status != "done":
        raise StageFailedError(f"{stage} of trial {trial_id} failed: {record.error}")
    return summarize(record)


# Tasks and flows here are decorated by call, not with @: Prefect ships the current flow and
# task to Dask workers, and a function whose module name points at its decorated object is
# pickled by value with the globals it reaches (here a registry holding locks). Decorated
# this way, workers import it by name. Prefect neither caches nor persists a stage's result:
# whether a stage runs is decided by cruijff's records and keys, and what it made is in the
# trial's folder (with PREFECT_RESULTS_PERSIST_BY_DEFAULT in a profile, each stage's summary
# would also go to Prefect's result storage, under a key of Prefect's: the task's inputs and
# source hashed for every task run, the result store asked).
run_stage = task(name="stage", cache_policy=NO_CACHE, persist_result=False)(_run_stage)


def _submitter(experiment: str, threads: int, endpoints: Endpoints) -> Any:
    """cruijff.pipeline's seam: an attempt of a stage is a Prefect task on the trial's Dask
    cluster, named and tagged for the UI. An attempt grow_on_oom gives more memory runs on a
    cluster of that shape, as a subflow of the trial's (its own task runner).

    Each attempt of cruijff's retry loop (cruijff.pipeline.run_with_retries) is its own task
    run, `trial-<id>/<stage> attempt <n>` tagged `attempt:<n>`: the loop runs in the flow, not
    as Prefect task retries, which would be lost with a Slurm worker job."""
    def submit(trial: Trial, stage: str, key: str, attempt: int,
               grown: dict[str, Any] | None) -> bool:
        name = attempt_name(trial.id, stage, attempt)
        if grown and endpoints.grown is not None:
            endpoint = endpoints.grown(trial, grown)
            runner = DaskTaskRunner(address=endpoint.address,
                                    client_kwargs={"security": endpoint.security})
            state = grown_flow.with_options(
                flow_run_name=f"{name} (" + ", ".join(f"{k} {v}" for k, v in grown.items())
                + ")",
                task_runner=runner,
            )(experiment, trial.id, stage, key, threads, grown, name, attempt,
              return_state=True)
            return state.is_completed() and state.result(raise_on_failure=False) is True
        return _attempt(experiment, trial.id, stage, key, threads, None, name, attempt)

    return submit


def attempt_name(trial_id: str, stage: str, attempt: int) -> str:
    """A stage attempt's task run name: `trial-a/finetune attempt 2`."""
    return f"trial-{trial_id}/{stage} attempt {attempt}"


def _attempt(experiment: str, trial_id: str, stage: str, key: str, threads: int,
             grown: dict[str, Any] | None, name: str, attempt: int = 1) -> bool:
    """Submit one attempt as a stage task to the current flow's task runner; wait for it."""
    # The annotation is read in the thread that submits: here, not around the run.
    with dask.annotate(resources={STAGE_SLOT: 1}):
        future = run_stage.with_options(
            task_run_name=name,
            tags=[f"stage:{stage}", f"attempt:{attempt}"]
            + ([f"grown:{k}={v}" for k, v in grown.items()] if grown else []),
        ).submit(experiment, trial_id, stage, key, threads, grown)
    wait_for_stage(future, experiment, stop=STOP)  # raises if no Slurm job can be submitted
    if STOP.is_set():
        # A local stage was just stopped and records that; a Slurm stage ends with its
        # worker job, which closing the run's clusters cancels. One that finished as the
        # user stopped the run is done (its trial's subflow completes).
        future.wait(timeout=STOP_GRACE_S + 5)
    return future.state.is_completed()


grown_flow = flow(name="cruijff-grown-attempt")(_attempt)


def _trial(experiment: str, trial_id: str, stages: list[str], run_id: str,
           threads: int = 1, retries: int = 1) -> dict[str, str] | State:
    """One trial's pipeline (cruijff.pipeline.run_trial) as a Prefect subflow."""
    exp = load_experiment(Path(experiment))
    outcome = run_trial(exp, exp.trial(trial_id), stages,
                        _submitter(experiment, threads, _ENDPOINTS.get(run_id, Endpoints())),
                        report=lambda record: _show_use(exp.name, trial_id, record),
                        sharing=_RUNS[run_id], retries=retries)
    ending = trial_ending(outcome, stages)
    if ending == "stopped":
        return Cancelled(message=f"stopped by the user; done: {outcome}")
    if ending == "failed":
        raise StageFailedError(f"trial {trial_id}: {outcome}")
    return outcome


trial_flow = flow(name="cruijff-trial")(_trial)


def _experiment(experiment: str, stage: str | None = None, trials: str | None = None,
                workers: int | None = None, retries: int | None = None,
                executor: str | None = None, force: bool = False) -> dict[str, str] | State:
    """All selected trials as concurrent subflows, their stages on Dask workers: threads of
    a LocalCluster, or Slurm jobs of one SLURMCluster per resource profile."""
    plan = RunPlan.make(Path(experiment), stage=stage, trials=trials, force=force,
                        executor=executor, workers=workers, retries=retries)
    exp = plan.experiment
    run_id = uuid.uuid4().hex
    if plan.executor == "slurm":
        import dask_jobqueue  # noqa: F401  # its import sets a SIGINT handler: let ours win
    with tags("cruijff", f"exp:{exp.name}"), hold(plan) as sharing, no_heartbeats():
        _RUNS[run_id] = sharing
        try:
            with clusters(exp, [t for t, _ in plan.selection], executor=plan.executor,
                          workers=plan.workers, max_jobs=exp.orchestration.max_jobs
                          ) as addresses:
                _ENDPOINTS[run_id] = addresses

                def start(trial: Trial, stages: list[str]) -> str:
                    with tags(f"trial:{trial.id}"):
                        subflow = trial_flow.with_options(
                            flow_run_name=f"{exp.name}/trial-{trial.id}",
                            task_runner=DaskTaskRunner(
                                address=addresses[trial.id].address,
                                client_kwargs={"security": addresses[trial.id].security}),
                        )
                        return _start_trial(subflow, experiment, trial.id, stages, run_id,
                                            plan.threads, plan.retries)

                # Trials beyond what the workers can run wait here, not as live subflows: 200
                # subflows at once overwhelm a SQLite-backed Prefect server (HTTP 503). Twice
                # the slots keeps the next stage queued on Dask as a worker frees; a trial
                # waiting for a shared stage gives its place up (cruijff.pipeline.Places).
                slots = len({e.address for e in addresses.values()}) * (
                    plan.workers if plan.executor == "local" else exp.orchestration.max_jobs)
                states = run_concurrently(plan.selection, start, 2 * slots, sharing)
        finally:
            _RUNS.pop(run_id, None)
            _ENDPOINTS.pop(run_id, None)
    if STOP.is_set():
        return Cancelled(message="stopped by the user (Ctrl-C or SIGTERM): `cruijff run` "
                         "resumes the experiment")
    publish(exp)  # how it went, as artifacts of this flow run (never fails it)
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
    with tags("cruijff", f"exp:{name}"), no_heartbeats():
        state = experiment_flow.with_options(flow_run_name=name)(
            str(experiment), stage, trials, workers, None, executor, force, return_state=True
        )
    if state.is_failed():
        error = state.result(raise_on_failure=False)
        if isinstance(error, SlurmSubmitError):
            raise error  # the CLI's one line (exit 2): no job could be submitted
    return state.is_completed()
