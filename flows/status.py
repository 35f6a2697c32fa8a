"""Prefect's view of an experiment for `cruijff summary`: the latest state of its flow runs,
and the repair of runs left 'Running' by a process that is gone (PrefectHQ/prefect#12969)."""

from __future__ import annotations

import asyncio

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Crashed


def flow_run_states(api: str, experiment: str) -> dict[str, str]:
    """Flow-run name -> state of the newest run of that name tagged with the experiment."""
    async def read() -> dict[str, str]:
        async with PrefectClient(api=api) as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"exp:{experiment}"])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=200)
        states: dict[str, str] = {}
        for run in runs:
            states.setdefault(run.name, run.state_name or "unknown")
        return states

    return asyncio.run(read())


def crash_orphaned_runs(api: str, experiment: str) -> int:
    """Mark this experiment's flow runs that say Running as Crashed. Call only when no
    `cruijff run` holds the experiment: then nothing can be running them."""
    async def repair() -> int:
        async with PrefectClient(api=api) as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[f"exp:{experiment}"]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
            for run in runs:
                await client.set_flow_run_state(
                    run.id, Crashed(message="no cruijff run holds the experiment any more"),
                    force=True)
            return len(runs)

    return asyncio.run(repair())


def prefect_view(api: str, experiment: str, *, repair: bool) -> tuple[dict[str, str], str | None]:
    """(flow-run states, notice) from the server at `api`; a notice if it fails to answer."""
    try:
        if repair:
            crash_orphaned_runs(api, experiment)
        return flow_run_states(api, experiment), None
    except Exception as exc:  # any client failure: the summary still answers from disk
        return {}, f"Prefect at {api} did not answer ({type(exc).__name__}): from disk only."
