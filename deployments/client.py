"""The client side of cruijff's deployments: is one served, trigger it, wait for its run.
Kept apart from the flows so that `cruijff run --no-wait` does not import Dask."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import DeploymentStatus, State
from prefect.client.schemas.responses import DeploymentResponse
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Cancelling

from cruijff.errors import CruijffError

EXPERIMENT_DEPLOYMENT = "cruijff-experiment/run"
RERUN_DEPLOYMENT = "cruijff-rerun/rerun-failed"


async def _deployment(name: str) -> DeploymentResponse | None:
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            return await client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


POLLED_WITHIN = 30.0
"""A deployment counts as served only if something polled for its runs this recently
(Prefect's READY status outlives a stopped `cruijff serve` by a minute)."""
PICKUP_TIMEOUT = 60.0


def served_experiment_deployment() -> UUID | None:
    """The experiment deployment's id if something is polling for its runs right now."""
    deployment = asyncio.run(_deployment(EXPERIMENT_DEPLOYMENT))
    if deployment is None or deployment.status != DeploymentStatus.READY:
        return None
    polled = deployment.last_polled
    if polled is None or (datetime.now(UTC) - polled).total_seconds() > POLLED_WITHIN:
        return None
    return deployment.id


def trigger(deployment: UUID, parameters: dict, experiment_name: str) -> UUID:
    flow_run = run_deployment(deployment, parameters=parameters, timeout=0,
                              tags=["cruijff", f"exp:{experiment_name}"],
                              flow_run_name=experiment_name)
    return flow_run.id


def wait_for(flow_run_id: UUID, poll: float = 1.0) -> bool:
    """Wait for a triggered run to end; True if it completed. A run that nothing picks up
    within PICKUP_TIMEOUT is cancelled and reported, never waited on forever."""
    async def state() -> State | None:
        async with get_client() as client:
            return (await client.read_flow_run(flow_run_id)).state

    async def cancel() -> None:
        async with get_client() as client:
            await client.set_flow_run_state(
                flow_run_id, Cancelled(message="no worker picked it up"), force=True)

    async def stop() -> None:
        """Ctrl-C here stops the run there: Cancelling makes its runner SIGTERM the flow run's
        process, which stops cleanly (runner.stop_on_signals)."""
        async with get_client() as client:
            await client.set_flow_run_state(flow_run_id, Cancelling(message="Ctrl-C by the user"))

    start = time.monotonic()
    while True:
        try:
            current = asyncio.run(state())
            if current is not None and current.is_final():
                return current.is_completed()
            waiting = current is None or current.is_scheduled() or current.is_pending()
            if waiting and time.monotonic() - start > PICKUP_TIMEOUT:
                asyncio.run(cancel())
                raise CruijffError(
                    f"nothing picked up flow run {flow_run_id} in {PICKUP_TIMEOUT:.0f} s (is "
                    "`cruijff serve` or the pool's worker running?): cancelled it; run with "
                    "--local to run in this process")
            time.sleep(poll)
        except KeyboardInterrupt:
            asyncio.run(stop())
            print(f"Stopping: asked the served deployment to cancel flow run {flow_run_id}; its "
                  "running stages end and are recorded interrupted (Ctrl-C again: stop waiting).",
                  file=sys.stderr)
            _wait_until_stopped(state, poll)
            raise


STOP_WAIT = 60.0
"""How long Ctrl-C waits for the served run to end: its stages get SIGTERM, then SIGKILL after
10 s. Until it ends it still holds the experiment, so an immediate `cruijff run` would refuse."""


def _wait_until_stopped(state: Callable[[], Coroutine[Any, Any, State | None]],
                        poll: float) -> None:
    deadline = time.monotonic() + STOP_WAIT
    try:
        while time.monotonic() < deadline:
            current = asyncio.run(state())
            if current is not None and current.is_final():
                print("Stopped: `cruijff run` resumes the experiment.", file=sys.stderr)
                return
            time.sleep(poll)
        print(f"The flow run is still stopping after {STOP_WAIT:.0f} s; `cruijff run` resumes "
              "once it has ended.", file=sys.stderr)
    except KeyboardInterrupt:
        print("Not waiting: the flow run goes on stopping by itself.", file=sys.stderr)


