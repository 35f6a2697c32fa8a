"""Deployments of cruijff's flows: served by `cruijff serve` (laptops, CI, a login node), or
registered on a process work pool by `cruijff deploy` (an HPC service node runs
`prefect worker start --pool NAME`). `cruijff run` triggers the experiment deployment when it
is ready, and `cruijff schedule-reruns` puts a cron schedule on the re-run deployment.
"""

from __future__ import annotations

import asyncio
import os
from uuid import UUID

from cruijff.deployments.client import EXPERIMENT_DEPLOYMENT, RERUN_DEPLOYMENT
from cruijff.flows.experiment import experiment_flow
from prefect import flow, tags
from prefect.client.orchestration import get_client
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import EntrypointType

from cruijff.errors import CruijffError
from cruijff.pipeline import RunPlan
from cruijff.runner import load_experiment, unlocked


def _rerun(experiment: str) -> str:
    """Run an experiment's failed trials again: only their unfinished stages run."""
    exp = load_experiment(experiment)
    if not unlocked(exp):
        return f"{exp.name} is being run now; nothing to re-run"
    plan = RunPlan.make(exp.path, failed=True)
    if plan.note:
        return f"{exp.name} has no failed trials"
    with tags("cruijff", f"exp:{exp.name}"):
        experiment_flow.with_options(flow_run_name=f"{exp.name}/rerun")(
            experiment, None, plan.trials)
    return f"re-ran trials {', '.join(t.id for t, _ in plan.selection)} of {exp.name}"


rerun_flow = flow(name="cruijff-rerun")(_rerun)


def _deployments(work_pool: str | None = None) -> list:
    """Both deployments; for a work pool, by module path, since a worker imports the flow
    from the installed package (cruijff's flows are objects named apart from their
    functions, see flows/experiment.py, so the entrypoint names the object)."""
    deployments = []
    for flow_object, entrypoint, name in (
        (experiment_flow, "cruijff.flows.experiment.experiment_flow", EXPERIMENT_DEPLOYMENT),
        (rerun_flow, "cruijff.deployments.serve.rerun_flow", RERUN_DEPLOYMENT),
    ):
        kinds = {"work_pool_name": work_pool, "entrypoint_type": EntrypointType.MODULE_PATH} \
            if work_pool else {}
        deployment = flow_object.to_deployment(name=name.split("/")[1], tags=["cruijff"],
                                               **kinds)
        if work_pool:
            deployment.entrypoint = entrypoint
        deployments.append(deployment)
    return deployments


def serve() -> None:
    """Serve both deployments from this process until interrupted (polls every second)."""
    from prefect import serve as prefect_serve

    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "1")
    prefect_serve(*_deployments(), print_starting_message=False)


def deploy(work_pool: str) -> list[UUID]:
    """Register both deployments on a process work pool (created if missing)."""
    from prefect import deploy as prefect_deploy

    async def ensure_pool() -> None:
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectNotFound

        async with get_client() as client:
            try:
                await client.read_work_pool(work_pool)
            except ObjectNotFound:
                await client.create_work_pool(WorkPoolCreate(name=work_pool, type="process"))

    asyncio.run(ensure_pool())
    return list(prefect_deploy(*_deployments(work_pool), work_pool_name=work_pool,
                               build=False, push=False, print_next_steps_message=False))


def schedule_reruns(experiment: str, cron: str | None) -> str:
    """Put (or, with cron None, remove) a cron schedule re-running this experiment's failed
    trials on the re-run deployment, which must be served or deployed."""
    exp = load_experiment(experiment)
    slug = f"rerun-{exp.name}"[:100]

    async def apply() -> str:
        async with get_client() as client:
            try:
                deployment = await client.read_deployment_by_name(RERUN_DEPLOYMENT)
            except Exception:
                raise CruijffError("no re-run deployment: start `cruijff serve` (or "
                                   "`cruijff deploy --pool NAME`) first") from None
            new = None
            if cron is not None:
                try:  # checked before the old schedule goes (cruijff.cron checked it first)
                    new = CronSchedule(cron=cron)
                except ValueError as exc:
                    reason = str(exc).split("Value error, ")[-1].splitlines()[0]
                    raise CruijffError(f"--cron {cron!r}: {reason}") from None
            for schedule in deployment.schedules:
                if schedule.slug == slug:
                    await client.delete_deployment_schedule(deployment.id, schedule.id)
            if new is None:
                return f"Removed the re-run schedule of {exp.name}."
            await client.create_deployment_schedules(
                deployment.id, [(new, True)], parameters={"experiment": str(exp.path)},
                slug=slug)
            return f"Failed trials of {exp.name} will re-run on '{cron}'."

    return asyncio.run(apply())
