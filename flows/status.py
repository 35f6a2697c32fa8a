"""Prefect's view of an experiment for `cruijff summary`: the latest state of its flow runs,
and the repair of runs left 'Running' by a process that is gone (PrefectHQ/prefect#12969)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Crashed

PAGE = 200
"""Flow runs per request: the server's default (and most) per page."""


def flow_run_states(api: str, experiment: str, names: set[str] | None = None
                    ) -> dict[str, str]:
    """Flow-run name -> state of the newest run of that name tagged with the experiment, page
    by page (a 1,000-trial experiment has more runs than one page holds); with `names`, only
    those, stopping once each has been seen."""
    async def read() -> dict[str, str]:
        states: dict[str, str] = {}
        async with PrefectClient(api=api) as client:
            offset = 0
            while True:
                runs = await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        tags=FlowRunFilterTags(all_=[f"exp:{experiment}"]),
                        name=FlowRunFilterName(any_=sorted(names)) if names else None),
                    sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=PAGE, offset=offset)
                for run in runs:
                    states.setdefault(run.name, run.state_name or "unknown")
                offset += len(runs)
                if len(runs) < PAGE or (names is not None and names <= states.keys()):
                    return states

    return asyncio.run(read())


ORPHAN_MIN_AGE = timedelta(seconds=10)
"""A run's flow starts a moment before it takes the experiment's lock: a Running flow run
this young may belong to a run that is just starting, never to an orphan."""


def crash_orphaned_runs(api: str, experiment: str, unheld: Callable[[], bool]) -> int:
    """Mark this experiment's flow runs that say Running as Crashed when no `cruijff run`
    holds the experiment (`unheld()`, asked again just before): nothing can be running them."""
    async def repair() -> int:
        async with PrefectClient(api=api) as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[f"exp:{experiment}"]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
            old = datetime.now(UTC) - ORPHAN_MIN_AGE
            runs = [r for r in runs if r.start_time is None or r.start_time < old]
            if not runs or not unheld():
                return 0
            for run in runs:
                await client.set_flow_run_state(
                    run.id, Crashed(message="no cruijff run holds the experiment any more"),
                    force=True)
            return len(runs)

    return asyncio.run(repair())


def prefect_view(api: str, experiment: str, *, unheld: Callable[[], bool] | None,
                 names: set[str] | None = None) -> tuple[dict[str, str], str | None]:
    """(flow-run states, notice) from the server at `api`; a notice if it fails to answer.
    With `unheld` (no run holds the experiment), orphaned Running runs are repaired first;
    `names`: only the states of these flow runs."""
    try:
        if unheld is not None:
            crash_orphaned_runs(api, experiment, unheld)
        return flow_run_states(api, experiment, names), None
    except Exception as exc:  # any client failure: the summary still answers from disk
        return {}, f"Prefect at {api} did not answer ({type(exc).__name__}): from disk only."
