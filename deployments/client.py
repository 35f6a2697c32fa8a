"""The client side of cruijff's deployments: is one served, trigger it, wait for its run.
Kept apart from the flows so that `cruijff run --no-wait` does not import Dask."""

from __future__ import annotations

import asyncio
import time
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import DeploymentStatus, State
from prefect.client.schemas.responses import DeploymentResponse
from prefect.deployments import run_deployment

EXPERIMENT_DEPLOYMENT = "cruijff-experiment/run"
RERUN_DEPLOYMENT = "cruijff-rerun/rerun-failed"


async def _deployment(name: str) -> DeploymentResponse | None:
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            return await client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def served_experiment_deployment() -> UUID | None:
    """The experiment deployment's id if something is polling for its runs right now."""
    deployment = asyncio.run(_deployment(EXPERIMENT_DEPLOYMENT))
    if deployment is None or deployment.status != DeploymentStatus.READY:
        return None
    return deployment.id


def trigger(deployment: UUID, parameters: dict, experiment_name: str) -> UUID:
    flow_run = run_deployment(deployment, parameters=parameters, timeout=0,
                              tags=["cruijff", f"exp:{experiment_name}"],
                              flow_run_name=experiment_name)
    return flow_run.id


def wait_for(flow_run_id: UUID, poll: float = 1.0) -> bool:
    """Wait for a triggered run to end; True if it completed."""
    async def state() -> State | None:
        async with get_client() as client:
            return (await client.read_flow_run(flow_run_id)).state

    while True:
        current = asyncio.run(state())
        if current is not None and current.is_final():
            return current.is_completed()
        time.sleep(poll)


