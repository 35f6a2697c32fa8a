"""Prefect's view of an experiment for `cruijff summary`: the latest state of its flow runs,
and the repair of runs left 'Running' by a process that is gone (PrefectHQ/prefect#12969).

Read over Prefect's REST API with the standard library's urllib, not Prefect's client:
importing Prefect costs a `summary` ~2 s, most of its time at 1,000 trials (issue 17); and
not httpx either, whose import and TLS context were another ~0.1 s. A local server is never
reached through a proxy (as cruijff.service's health check). A server that asks for
credentials gets the ones Prefect's own client would send (its settings, read only then)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from cruijff.service import is_local

PAGE = 200
"""Flow runs per request: the server's default (and most) per page."""


class _Api:
    """POSTs to one Prefect server's API, with Prefect's credentials once it asks for them."""

    def __init__(self, api: str) -> None:
        self.base = api.rstrip("/")
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}) if is_local(api) else urllib.request.ProxyHandler())

    def _send(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                         headers=self.headers, method="POST")
        with self.opener.open(request, timeout=30.0) as answer:
            return json.loads(answer.read() or b"null")

    def post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            return self._send(path, body)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code not in (401, 403) or "Authorization" in self.headers:
                raise
        self.headers.update(_prefect_credentials())
        return self._send(path, body)

    def flow_runs(self, experiment: str, *, names: set[str] | None = None,
                  running: bool = False, offset: int = 0) -> list[dict[str, Any]]:
        """One page of the experiment's flow runs, newest first."""
        runs: dict[str, Any] = {"tags": {"all_": [f"exp:{experiment}"]}}
        if names:
            runs["name"] = {"any_": sorted(names)}
        if running:
            runs["state"] = {"type": {"any_": ["RUNNING"]}}
        return self.post("/flow_runs/filter", {"flow_runs": runs, "limit": PAGE,
                                               "offset": offset,
                                               "sort": "EXPECTED_START_TIME_DESC"})


def _prefect_credentials() -> dict[str, str]:
    """The Authorization header Prefect's client sends (an auth string, else an API key),
    from Prefect's settings as they are now (environment, profile, prefect.toml)."""
    from prefect.settings import Settings

    api = Settings().api
    if api.auth_string is not None and (auth := api.auth_string.get_secret_value()):
        return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    if api.key is not None and (key := api.key.get_secret_value()):
        return {"Authorization": f"Bearer {key}"}
    return {}


def flow_run_states(api: str, experiment: str, names: set[str] | None = None
                    ) -> dict[str, str]:
    """Flow-run name -> state of the newest run of that name tagged with the experiment, page
    by page (a 1,000-trial experiment has more runs than one page holds); with `names`, only
    those, stopping once each has been seen."""
    states: dict[str, str] = {}
    prefect = _Api(api)
    offset = 0
    while True:
        runs = prefect.flow_runs(experiment, names=names, offset=offset)
        for run in runs:
            states.setdefault(run["name"], run.get("state_name") or "unknown")
        offset += len(runs)
        if len(runs) < PAGE or (names is not None and names <= states.keys()):
            return states


ORPHAN_MIN_AGE = timedelta(seconds=10)
"""A run's flow starts a moment before it takes the experiment's lock: a Running flow run
this young may belong to a run that is just starting, never to an orphan."""


def crash_orphaned_runs(api: str, experiment: str, unheld: Callable[[], bool]) -> int:
    """Mark this experiment's flow runs that say Running as Crashed when no `cruijff run`
    holds the experiment (`unheld()`, asked again just before): nothing can be running them."""
    prefect = _Api(api)
    old = datetime.now(UTC) - ORPHAN_MIN_AGE
    runs = [r for r in prefect.flow_runs(experiment, running=True)
            if r.get("start_time") is None
            or datetime.fromisoformat(r["start_time"]) < old]
    if not runs or not unheld():
        return 0
    for run in runs:
        prefect.post(f"/flow_runs/{run['id']}/set_state", {
            "state": {"type": "CRASHED", "name": "Crashed",
                      "message": "no cruijff run holds the experiment any more"},
            "force": True})
    return len(runs)


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
