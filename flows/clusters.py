"""Dask clusters for an experiment run: a LocalCluster, or one SLURMCluster per resource shape.

A SLURMCluster has one resource shape, so trials are grouped by their (merged) resource
profile; each group gets its own cluster of worker jobs, scaled adaptively up to
`orchestration.max_jobs`. One worker per job, one stage at a time per worker. A worker job
runs all the stages of the trials it serves, so a trial's profile (its config.yaml's
`resources`, written by the build) is the most its stages' own profiles ask for, field by
field (mem, time, gres count, cpus_per_task: settings.ExperimentConfig.worker_profile);
each stage's own profile is in `stage_resources` and in its `<stage>.slurm` script.

Worker jobs are submitted with bounded retries (`orchestration.submit_retries` within
`submit_timeout_s`): dask-jobqueue itself only logs a failed sbatch, and the run would wait
forever for a worker that never comes. A submission that gives up stops the run instead.

Nothing listens beyond this machine that need not: a local cluster's workers are threads
talking in-process, its HTTP endpoints (status pages, metrics) bind 127.0.0.1. A Slurm run's
scheduler must be reached from compute nodes, so its traffic is TLS with certificates made
for the run (only its worker jobs hold them: a client without them cannot connect, let alone
run code there), on the interface or host `orchestration.interface`/`host` names; HTTP
endpoints bind 127.0.0.1 there too.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import dask
from distributed import LocalCluster
from distributed.deploy.cluster import Cluster
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.security import Security

from cruijff.attempts import trial_profile
from cruijff.runner import STOP, Experiment, Trial
from cruijff.settings import OrchestrationConfig, ResourceProfile
from cruijff.slurm import (
    SlurmSubmitError,
    built_prologue,
    queued_jobs,
    sbatch_options,
    worker_job_name,
)

# A worker lost mid-stage fails the stage at once; the trial subflow's retries (one mechanism,
# one budget: orchestration.retries) then run it again on a new worker.
# The worker's statistical profiler samples every thread every 10 ms (~1 s of CPU in a short
# run): nobody reads its flame graphs, the dashboard is off. Worker jobs on Slurm get the same
# through DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED in their environment. The system monitor
# (psutil's view of this process, twice a second, for the dashboard) is as idle here: the
# stages' CPU and memory are theirs, measured per attempt (cruijff.usage).
DASK_CONFIG = {"distributed.scheduler.allowed-failures": 0, "distributed.admin.tick.limit": "1h",
               "distributed.worker.profile.enabled": False,
               "distributed.admin.system-monitor.interval": "1h"}
# Every worker holds one unit of this resource and every stage task needs it (flows/experiment
# submits each with it), so a worker runs one stage at a time. The scheduler checks only that a
# worker has the resource, not that it is free: a stage may wait on a busy worker and be lost
# with it (a cancelled job); cruijff.pipeline.run_with_retries submits such a stage again
# without counting an attempt, and KeepBusyWorkers keeps adaptive scaling off busy workers.
STAGE_SLOT = "cruijff_stage"
SET_BY_JOBQUEUE = ("--mem=", "--time=", "--job-name=")
LOOPBACK_HTTP = "127.0.0.1:0"
"""Where every scheduler's and worker's HTTP endpoints listen: this host only, any port."""


class KeepBusyWorkers(SchedulerPlugin):
    """Adaptive scaling may close only workers that run no stage. Left to itself, the
    scheduler picks workers to close by memory when its (short) estimate of the work says
    fewer are needed, busy ones included; closing one cancels its Slurm job and fails the
    stage running there, another trial's."""

    name = "cruijff-keep-busy-workers"

    def valid_workers_downscaling(self, scheduler: Any, workers: list) -> list:
        return [ws for ws in workers if not ws.processing]


def profile_of(trial: Trial) -> ResourceProfile:
    """The profile of a trial's worker jobs: the most its stages ask for (the build writes it
    as `resources`; an experiment built before per-stage profiles has only that one)."""
    return trial_profile(trial)


def group_by_profile(trials: list[Trial]) -> dict[str, tuple[ResourceProfile, list[Trial]]]:
    """Trials with the same resource shape share one cluster; keyed by a readable name."""
    groups: dict[str, tuple[ResourceProfile, list[Trial]]] = {}
    names: dict[str, str] = {}
    for trial in trials:
        profile = profile_of(trial)
        shape = json.dumps(profile.requests(), sort_keys=True)
        if shape not in names:
            names[shape] = f"profile{len(names) + 1}"
            groups[names[shape]] = (profile, [])
        groups[names[shape]][1].append(trial)
    return groups


def slurm_log_dir(experiment: Experiment) -> Path:
    """Worker job logs (Dask's); each stage's own log is in its trial folder."""
    return experiment.path / ".cruijff" / "slurm"


NO_SBATCH = ("sbatch is not on PATH: run cruijff where Slurm's commands are (a login node), "
             "or use --executor local")
FIRST_WAIT_S = 2.0


class Submitter:
    """Submits one run's worker jobs: a failed sbatch is tried again after 2, 4, 8 ... s, at
    most `retries` times and within `budget_s` of the first try. Each failed try is logged to
    `<experiment>/.cruijff/slurm/submit.log`; once one job gives up, `failure` says why (the
    flow stops on it) and every later submission gives up at once."""

    def __init__(self, settings: OrchestrationConfig, log: Path) -> None:
        self.retries = settings.submit_retries
        self.budget_s = settings.submit_timeout_s
        self.log = log
        self.failure: str | None = None

    def _note(self, line: str) -> None:
        with self.log.open("a", encoding="utf-8") as handle:
            handle.write(f"{datetime.now().isoformat(timespec='seconds')} {line}\n")

    async def submit(self, command: list[str]) -> str:
        """sbatch's stdout, or "" on giving up. Not an exception: dask-jobqueue would only log
        it (with a traceback, on the researcher's terminal) and the flow would never know."""
        if self.failure is not None:
            return ""
        start, wait, tries = time.monotonic(), FIRST_WAIT_S, 0
        while True:
            tries += 1
            left = self.budget_s - (time.monotonic() - start)
            try:
                out = await _call(command, timeout=max(1.0, left))
            except FileNotFoundError:
                self.failure = NO_SBATCH
                return ""
            except RuntimeError as exc:
                problem = str(exc)
            else:
                if tries > 1:
                    self._note(f"try {tries} succeeded: {out.strip()}")
                return out
            elapsed = time.monotonic() - start
            self._note(f"try {tries} failed after {elapsed:.0f} s: {problem}")
            if tries > self.retries or elapsed + wait >= self.budget_s:
                self.failure = (f"sbatch failed {tries} time{'s' if tries > 1 else ''} over "
                                f"{elapsed:.0f} s: {problem}: is the Slurm controller up? "
                                "(check with sinfo, then run again)")
                return ""
            await asyncio.sleep(wait)
            wait *= 2


async def _call(command: list[str], timeout: float) -> str:
    """Run a command, killed after `timeout` s with all it started (sites often wrap sbatch
    in a script); RuntimeError with its last stderr line."""
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise RuntimeError(f"{command[0]} did not answer within {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = (err or out).decode(errors="replace").strip().splitlines()
        raise RuntimeError(lines[-1].removeprefix(f"{command[0]}: ").removeprefix("error: ")
                           if lines else f"exit code {proc.returncode} and no output")
    return out.decode(errors="replace")


@functools.cache
def retrying_job_class() -> type:
    """Defined on first use: importing dask_jobqueue sets a SIGINT handler, which fails (and
    would break every served flow run) when Prefect loads this module off the main thread."""
    from dask_jobqueue.slurm import SLURMJob

    class RetryingSLURMJob(SLURMJob):
        """A SLURMJob whose sbatch goes through a Submitter (retries, then a clear failure). A job
        whose submission gave up starts as no job at all (job id None): no worker comes from it,
        and the flow stops on the Submitter's failure."""

        def __init__(self, *args: Any, submitter: Submitter | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.submitter = submitter

        async def _submit_job(self, script_filename: str) -> str:
            if self.submitter is None:
                return await super()._submit_job(script_filename)
            return await self.submitter.submit([self.submit_command, script_filename])

        def _job_id_from_submit_output(self, out: str) -> str | None:
            return super()._job_id_from_submit_output(out) if out else None

    return RetryingSLURMJob


# Submitters of the runs in this process, by experiment folder: trial threads look theirs up.
_SUBMITTERS: dict[str, Submitter] = {}
_SUBMITTERS_LOCK = threading.Lock()


def _key(experiment: str | Path) -> str:
    return str(Path(experiment).expanduser().resolve())


def submit_failure(experiment: str | Path) -> str | None:
    """Why this experiment's run gave up submitting worker jobs, if it did."""
    with _SUBMITTERS_LOCK:
        submitter = _SUBMITTERS.get(_key(experiment))
    return None if submitter is None else submitter.failure


def wait_for_stage(future: Any, experiment: str, poll_s: float = 1.0,
                   stop: threading.Event | None = None) -> None:
    """Wait for a stage task's future, like `future.wait()`, but raise SlurmSubmitError as soon
    as the run gave up submitting worker jobs: no worker will ever pick the task up. Returns
    early once `stop` is set (the user stopped the run). The Dask future is waited on once,
    when done (a callback says so), not polled."""
    done = threading.Event()
    future.wrapped_future.add_done_callback(lambda _: done.set())
    while not done.wait(poll_s):
        if stop is not None and stop.is_set():
            return
        failure = submit_failure(experiment)
        if failure is not None:
            raise SlurmSubmitError(failure)
    future.wait()  # returns at once: records the task's final state on the Prefect future


def run_security(folder: Path) -> Security:
    """TLS for one run: a certificate authority and a certificate made for it (dask's
    Security.temporary), written to files only the user may read, for worker jobs on other
    nodes to read (dask-jobqueue would otherwise leave its own copies behind)."""
    made = Security.temporary()
    written: dict[str, str] = {}
    for field, name in (("tls_ca_file", "ca.pem"), ("tls_worker_cert", "cert.pem"),
                        ("tls_worker_key", "key.pem")):
        path = folder / name
        path.touch(mode=0o600)
        path.write_text(getattr(made, field), encoding="utf-8")
        written[field] = str(path)
    return Security(
        tls_ca_file=written["tls_ca_file"], require_encryption=True,
        **{f"tls_{role}_{part}": written[f"tls_worker_{part}"]
           for role in ("scheduler", "worker", "client") for part in ("cert", "key")})


def slurm_cluster(experiment: Experiment, name: str, profile: ResourceProfile,
                  submitter: Submitter | None = None, *, tls_dir: Path) -> Cluster:
    """A SLURMCluster whose worker jobs request exactly the profile (validated, quoted); its
    traffic TLS with certificates made for it in `tls_dir` (a folder only the user reads)."""
    from dask_jobqueue import SLURMCluster

    values = profile.requests()
    cpus = int(values.get("cpus_per_task", 1))
    directives = [o for o in sbatch_options(profile) if not o.startswith(SET_BY_JOBQUEUE)]
    log_dir = slurm_log_dir(experiment)
    log_dir.mkdir(parents=True, exist_ok=True)
    network = experiment.orchestration
    scheduler_options: dict[str, Any] = {"dashboard": False, "dashboard_address": LOOPBACK_HTTP}
    if network.host:
        scheduler_options["host"] = network.host
    with dask.config.set(DASK_CONFIG):
        cluster = SLURMCluster(
            job_cls=retrying_job_class(),
            submitter=submitter,
            job_name=worker_job_name(experiment.name, name),
            cores=1,  # one worker thread: one stage per job; the job's CPUs go to the stage
            processes=1,
            memory=f"{values['mem']}GB" if "mem" in values else "4GB",
            walltime=values.get("time"),
            job_extra_directives=directives,
            job_directives_skip=["--cpus-per-task"] if "cpus_per_task" in values else [],
            # CRUIJFF_STAGE_STEP: each stage attempt runs as its own srun step, so sacct
            # accounts for it alone (cruijff.sacct.step_prefix)
            # the site's slurm.prologue (module load ..., conda activate ...) first
            job_script_prologue=[*built_prologue(experiment.path),
                                 f"export OMP_NUM_THREADS={cpus}", "export CRUIJFF_STAGE_STEP=1"],
            worker_extra_args=["--resources", f"{STAGE_SLOT}=1", "--no-dashboard",
                               "--dashboard-address", LOOPBACK_HTTP],
            log_directory=str(log_dir),
            python=sys.executable,
            silence_logs="error",
            security=run_security(tls_dir),
            interface=network.interface,
            scheduler_options=scheduler_options,
        )
    cluster.scheduler.add_plugin(KeepBusyWorkers())
    return cluster


@dataclass(frozen=True)
class Endpoint:
    """How a run's client reaches one cluster's scheduler."""

    address: str
    security: Security | None = None


class Endpoints(dict[str, Endpoint]):
    """Trial id -> its cluster's endpoint; on Slurm also `grown(trial, extra)`: the endpoint
    of a cluster whose worker jobs ask for the trial's profile with `extra` on top (an
    attempt grow_on_oom retries with more memory), started on first use, closed with the
    run's other clusters."""

    def __init__(self, grown: Callable[[Trial, dict[str, Any]], Endpoint] | None = None
                 ) -> None:
        super().__init__()
        self.grown = grown


@contextmanager
def clusters(experiment: Experiment, trials: list[Trial], *, executor: str, workers: int,
             max_jobs: int) -> Iterator[Endpoints]:
    """Start the clusters of a run; yields trial id -> its cluster's scheduler endpoint."""
    with ExitStack() as stack, dask.config.set(DASK_CONFIG):
        if executor == "local":
            # Workers are threads of this process: a stage is a subprocess anyway, and threads
            # start in milliseconds where worker processes take seconds to import Prefect.
            # No memory limit: a worker's would be this process's memory, not its stage's,
            # and its monitor polls it every 100 ms (with the system monitor, ~0.7 s of CPU
            # in a one-minute run of 6 trials, taken from the stages on a busy machine).
            # A failed stage task is cruijff's to report (results table, summary), not a
            # 'Compute Failed' traceback from the in-process worker on the researcher's terminal.
            worker_log = logging.getLogger("distributed.worker")
            stack.callback(worker_log.setLevel, worker_log.level)
            worker_log.setLevel(logging.CRITICAL)
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=False,
                resources={STAGE_SLOT: 1}, dashboard_address=LOOPBACK_HTTP,
                worker_dashboard_address=LOOPBACK_HTTP, silence_logs=logging.ERROR,
                memory_limit=0))
            local = Endpoints()
            local.update(dict.fromkeys((trial.id for trial in trials),
                                       Endpoint(cluster.scheduler_address)))
            yield local
            return
        if shutil.which("sbatch") is None:
            raise SlurmSubmitError(NO_SBATCH)
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # worker jobs inherit it
        os.environ.setdefault("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "False")  # and this
        log_dir = slurm_log_dir(experiment)
        log_dir.mkdir(parents=True, exist_ok=True)
        submitter = Submitter(experiment.orchestration, log_dir / "submit.log")
        key = _key(experiment.path)
        with _SUBMITTERS_LOCK:
            _SUBMITTERS[key] = submitter
        stack.callback(_forget, key, submitter)
        stack.callback(_jobs_gone_after_a_stop, experiment.name)  # after the clusters close
        tls_dir = Path(tempfile.mkdtemp(prefix=".tls-", dir=log_dir))  # mode 0700
        stack.callback(shutil.rmtree, tls_dir, True)
        grown_clusters: dict[str, Endpoint] = {}
        grown_lock = threading.Lock()

        def grown(trial: Trial, extra: dict[str, Any]) -> Endpoint:
            profile = profile_of(trial).model_copy(update=extra)
            shape = json.dumps(profile.requests(), sort_keys=True)
            with grown_lock:
                if shape not in grown_clusters:
                    name = f"grown{len(grown_clusters) + 1}"
                    cluster = stack.enter_context(slurm_cluster(
                        experiment, name, profile, submitter, tls_dir=tls_dir))
                    cluster.adapt(minimum=0, maximum=max_jobs)
                    grown_clusters[shape] = Endpoint(cluster.scheduler_address,
                                                     cluster.security)
                return grown_clusters[shape]

        addresses = Endpoints(grown)
        for name, (profile, members) in group_by_profile(trials).items():
            cluster = stack.enter_context(slurm_cluster(experiment, name, profile, submitter,
                                                        tls_dir=tls_dir))
            cluster.adapt(minimum=0, maximum=min(max_jobs, len(members)))
            endpoint = Endpoint(cluster.scheduler_address, cluster.security)
            addresses.update(dict.fromkeys((trial.id for trial in members), endpoint))
        yield addresses
        if submitter.failure is not None:  # trials stopped on it: the run fails with it
            raise SlurmSubmitError(submitter.failure)


JOBS_GONE_TIMEOUT_S = 60.0


def _jobs_gone_after_a_stop(experiment: str) -> None:
    """After the user stopped the run, closing the clusters cancels the worker jobs: wait
    (bounded) until Slurm has ended them, so that what their processes wrote as they were
    killed is on disk before the run settles its records (cruijff.pipeline.hold)."""
    deadline = time.monotonic() + JOBS_GONE_TIMEOUT_S
    while STOP.is_set() and time.monotonic() < deadline and queued_jobs(experiment):
        time.sleep(1)


def _forget(key: str, submitter: Submitter) -> None:
    with _SUBMITTERS_LOCK:
        if _SUBMITTERS.get(key) is submitter:
            del _SUBMITTERS[key]


def job_scripts(experiment: Experiment, trials: list[Trial]) -> dict[str, str]:
    """What each profile's worker jobs would be submitted as (nothing is submitted; the
    certificates they name are made for the look and removed)."""
    log_dir = slurm_log_dir(experiment)
    log_dir.mkdir(parents=True, exist_ok=True)
    scripts = {}
    with tempfile.TemporaryDirectory(prefix=".tls-", dir=log_dir) as tls:
        for name, (profile, members) in group_by_profile(trials).items():
            with slurm_cluster(experiment, name, profile, tls_dir=Path(tls)) as cluster:
                ids = ",".join(t.id for t in members)
                scripts[f"{name} (trials {ids})"] = cluster.job_script()
    return scripts
