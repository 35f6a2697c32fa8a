"""`summary` reads Prefect's flow-run states page by page: an experiment of more trials than
one page of runs (200) shows every trial's state, and the newest run of each name."""

from __future__ import annotations

import asyncio

from cruijff.flows import status


def test_every_trial_has_its_state_beyond_one_page(prefect_env, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import PrefectClient
    from prefect.states import Completed, Failed

    api = prefect_env["PREFECT_API_URL"]
    monkeypatch.setattr(status, "PAGE", 20)  # the same paging, with fewer runs to make

    @flow(name="cruijff-paging")
    def nothing() -> None:
        """Never run: its runs are made in the API only."""

    names = [f"pages/trial-{i}" for i in range(45)]

    async def make() -> None:
        async with PrefectClient(api=api) as client:
            for name in names:
                await client.create_flow_run(nothing, name=name, tags=["exp:pages"],
                                             state=Failed())
            await client.create_flow_run(nothing, name=names[0], tags=["exp:pages"],
                                         state=Completed())  # the newest of its name
            await client.create_flow_run(nothing, name="pages/trial-x", tags=["exp:other"],
                                         state=Completed())

    asyncio.run(make())
    states = status.flow_run_states(api, "pages")
    assert set(states) == set(names)
    assert states[names[0]] == "Completed" and states[names[44]] == "Failed"
    wanted = {names[3], names[40]}
    assert status.flow_run_states(api, "pages", wanted) == {n: "Failed" for n in wanted}
