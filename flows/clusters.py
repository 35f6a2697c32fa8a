"""Dask clusters for an experiment run: a LocalCluster, or one SLURMCluster per resource shape.

A SLURMCluster has one resource shape, so trials are grouped by their (merged) resource
profile; each group gets its own cluster of worker jobs, scaled adaptively up to
`orchestration.max_jobs`. One worker per job, one stage at a time per worker.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import dask
from distributed import LocalCluster
from distributed.deploy.cluster import Cluster

from cruijff.runner import Experiment, Trial
from cruijff.settings import ResourceProfile
from cruijff.slurm import sbatch_options

# A worker lost mid-stage fails the stage at once; the trial subflow's retries (one mechanism,
# one budget: orchestration.retries) then run it again on a new worker.
DASK_CONFIG = {"distributed.scheduler.allowed-failures": 0, "distributed.admin.tick.limit": "1h"}
# Every worker holds one unit of this resource and every stage task needs it: the scheduler
# then never queues a second stage on a busy worker, so a lost worker (a cancelled Slurm job)
# takes down only the stage it was running, not another trial's stage waiting behind it.
STAGE_SLOT = "cruijff_stage"
SET_BY_JOBQUEUE = ("--mem=", "--time=", "--job-name=")


def profile_of(trial: Trial) -> ResourceProfile:
    from cruijff.fileio import load_yaml_mapping

    data = load_yaml_mapping(trial.dir / "config.yaml", f"trial {trial.id} config")
    return ResourceProfile(**data.get("resources", {}))


def group_by_profile(trials: list[Trial]) -> dict[str, tuple[ResourceProfile, list[Trial]]]:
    """Trials with the same resource shape share one cluster; keyed by a readable name."""
    groups: dict[str, tuple[ResourceProfile, list[Trial]]] = {}
    names: dict[str, str] = {}
    for trial in trials:
        profile = profile_of(trial)
        shape = json.dumps(profile.model_dump(exclude_none=True), sort_keys=True)
        if shape not in names:
            names[shape] = f"profile{len(names) + 1}"
            groups[names[shape]] = (profile, [])
        groups[names[shape]][1].append(trial)
    return groups


def slurm_log_dir(experiment: Experiment) -> Path:
    """Worker job logs (Dask's); each stage's own log is in its trial folder."""
    return experiment.path / ".cruijff" / "slurm"


def slurm_cluster(experiment: Experiment, name: str, profile: ResourceProfile) -> Cluster:
    """A SLURMCluster whose worker jobs request exactly the profile (validated, quoted)."""
    from dask_jobqueue import SLURMCluster

    values = profile.model_dump(exclude_none=True)
    cpus = int(values.get("cpus_per_task", 1))
    directives = [o for o in sbatch_options(profile) if not o.startswith(SET_BY_JOBQUEUE)]
    log_dir = slurm_log_dir(experiment)
    log_dir.mkdir(parents=True, exist_ok=True)
    with dask.config.set(DASK_CONFIG):
        return SLURMCluster(
            job_name=f"cruijff-{experiment.name}-{name}",
            cores=1,  # one worker thread: one stage per job; the job's CPUs go to the stage
            processes=1,
            memory=f"{values['mem']}GB" if "mem" in values else "4GB",
            walltime=values.get("time"),
            job_extra_directives=directives,
            job_directives_skip=["--cpus-per-task"] if "cpus_per_task" in values else [],
            job_script_prologue=[f"export OMP_NUM_THREADS={cpus}"],
            worker_extra_args=["--resources", f"{STAGE_SLOT}=1"],
            log_directory=str(log_dir),
            python=sys.executable,
            silence_logs="error",
            scheduler_options={"dashboard_address": ":0"},
        )


@contextmanager
def clusters(experiment: Experiment, trials: list[Trial], *, executor: str, workers: int,
             max_jobs: int) -> Iterator[dict[str, str]]:
    """Start the clusters of a run; yields trial id -> scheduler address."""
    with ExitStack() as stack, dask.config.set(DASK_CONFIG), \
            dask.annotate(resources={STAGE_SLOT: 1}):
        if executor == "local":
            # Workers are threads of this process: a stage is a subprocess anyway, and threads
            # start in milliseconds where worker processes take seconds to import Prefect.
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=False,
                resources={STAGE_SLOT: 1}, dashboard_address=":0", silence_logs=logging.ERROR))
            yield {trial.id: cluster.scheduler_address for trial in trials}
            return
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # worker jobs inherit it
        addresses = {}
        for name, (profile, members) in group_by_profile(trials).items():
            cluster = stack.enter_context(slurm_cluster(experiment, name, profile))
            cluster.adapt(minimum=0, maximum=min(max_jobs, len(members)))
            addresses.update({trial.id: cluster.scheduler_address for trial in members})
        yield addresses


def job_scripts(experiment: Experiment, trials: list[Trial]) -> dict[str, str]:
    """What each profile's worker jobs would be submitted as (nothing is submitted)."""
    scripts = {}
    for name, (profile, members) in group_by_profile(trials).items():
        with slurm_cluster(experiment, name, profile) as cluster:
            ids = ",".join(t.id for t in members)
            scripts[f"{name} (trials {ids})"] = cluster.job_script()
    return scripts
