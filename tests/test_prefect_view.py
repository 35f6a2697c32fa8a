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


def test_a_server_that_asks_for_credentials_gets_prefects_auth_string(monkeypatch):
    """A self-hosted server with PREFECT_SERVER_API_AUTH_STRING answers 401 until the client
    sends Basic credentials: summary sends the ones Prefect's client would (a stub HTTP server
    stands in for that server's check; the real server's paging is tested above)."""
    import base64
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Guarded(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers.get("Authorization"), body))
            good = "Basic " + base64.b64encode(b"admin:pass").decode()
            ok = self.headers.get("Authorization") == good
            answer = json.dumps([{"name": "e/trial-a", "state_name": "Completed"}] if ok
                                else {"detail": "Unauthorized"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Guarded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:pass")
    try:
        api = f"http://127.0.0.1:{server.server_address[1]}/api"
        assert status.flow_run_states(api, "e") == {"e/trial-a": "Completed"}
    finally:
        server.shutdown()
    assert [(path, auth is not None) for path, auth, _ in seen] == [
        ("/api/flow_runs/filter", False), ("/api/flow_runs/filter", True)]
    assert seen[-1][2]["flow_runs"]["tags"] == {"all_": ["exp:e"]}


def test_a_local_server_is_read_past_a_proxy_set_in_the_environment(prefect_env, monkeypatch):
    """Clusters set HTTP_PROXY for the login node's way out; cruijff's own server on
    127.0.0.1 is read directly (a proxy on a closed port would fail every request)."""
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    api = prefect_env["PREFECT_API_URL"]
    states, notice = status.prefect_view(api, "nothing-here", unheld=lambda: True)
    assert (states, notice) == ({}, None)
    states, notice = status.prefect_view(f"http://127.0.0.1:{port}/api", "x", unheld=None)
    assert states == {} and notice.startswith(f"Prefect at http://127.0.0.1:{port}/api did "
                                              "not answer (URLError)")
