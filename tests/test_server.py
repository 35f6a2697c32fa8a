"""The managed local Prefect server: a real server (started once for the module), no mocks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from cruijff.flows.server import (
    ServerInfo,
    ensure_api,
    server_status,
    start_server,
    stop_server,
)

from cruijff.errors import CruijffError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cruijff-home")


@pytest.fixture(scope="module")
def server(home):
    """One managed server for the module, always stopped at the end."""
    try:
        yield start_server(home)
    finally:
        stop_server(home)


@pytest.fixture
def no_prefect_config(monkeypatch, tmp_path):
    """No PREFECT_API_URL anywhere: neither in the environment nor in a Prefect profile."""
    for name in (
        "PREFECT_API_URL",
        "PREFECT_PROFILE",
        "PREFECT_PROFILES_PATH",
        "PREFECT_SERVER_EPHEMERAL_ENABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "user-prefect-home"))
    monkeypatch.chdir(tmp_path)  # no prefect.toml / .env from the repository
    yield
    monkeypatch.undo()
    if "prefect.context" in sys.modules:  # ensure_api refreshed Prefect's settings: put back
        sys.modules["prefect.context"].refresh_global_settings_context()


def _listening(pid: int) -> list[tuple[str, int]]:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    return [
        (c.laddr.ip, c.laddr.port)
        for p in procs
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]


def test_start_is_healthy_and_reused(home, server):
    assert server.managed and server.pid
    assert server.url == f"{server.ui_url}/api"
    assert server.url.startswith("http://127.0.0.1:")
    assert server.database == str(home.resolve() / "prefect" / "prefect.db")
    assert Path(server.database).exists()
    assert server_status(home) == server
    again = start_server(home)
    assert again.pid == server.pid and again == server
    state = json.loads((home / "prefect" / "server.json").read_text())
    assert state["pid"] == server.pid and state["url"] == server.url
    assert (home / "prefect" / "server.log").exists()


def test_listens_on_loopback_only(server):
    port = int(server.ui_url.rsplit(":", 1)[1])
    addresses = _listening(server.pid)
    assert ("127.0.0.1", port) in addresses
    assert all(ip == "127.0.0.1" for ip, _ in addresses), addresses


def test_asking_for_another_port_while_running_is_an_error(home, server):
    port = int(server.ui_url.rsplit(":", 1)[1])
    with pytest.raises(CruijffError, match="already running"):
        start_server(home, port=port + 1)


def test_ensure_api_uses_the_managed_server(home, server, no_prefect_config):
    info = ensure_api(home)
    assert info == server
    assert os.environ["PREFECT_API_URL"] == server.url
    assert os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] == "false"
    from prefect.settings import get_current_settings

    assert get_current_settings().api.url == server.url  # refreshed in this process too
    # Called again (or in a child process that inherited the variable): still ours.
    assert ensure_api(home) == server


def test_ensure_api_with_unreachable_url_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with pytest.raises(CruijffError) as err:
        ensure_api(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "http://127.0.0.1:9/api" in message and "unreachable" in message
    assert "PREFECT_API_URL" in message
    assert server_status(tmp_path) is None  # nothing was started


def test_port_in_use_by_another_program(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(CruijffError, match=rf"port {port} .*in use"):
            start_server(tmp_path, port=port)
    assert server_status(tmp_path) is None


def test_stop_then_recover_from_stale_state_with_concurrent_starts(home, server):
    port = int(server.ui_url.rsplit(":", 1)[1])
    assert stop_server(home) is True
    assert not psutil.pid_exists(server.pid) or (
        psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE
    )
    assert server_status(home) is None
    assert stop_server(home) is False

    # A stale server.json: its pid is dead (as after a crash or a reboot).
    dead = subprocess.Popen(["true"])
    dead.wait()
    state_file = home / "prefect" / "server.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "pid": dead.pid, "create_time": None}))
    assert server_status(home) is None

    # Two processes start at once: one server, on the port it had before.
    code = (
        "import sys; from pathlib import Path; from cruijff.flows.server import start_server; "
        "print(start_server(Path(sys.argv[1])).pid)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(home)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    pids = {int(out.strip()) for out, _ in outs}
    assert len(pids) == 1, outs
    info = server_status(home)
    assert isinstance(info, ServerInfo)
    assert info.pid == pids.pop() and info.pid != server.pid
    assert info.ui_url == f"http://127.0.0.1:{port}"
    assert stop_server(home) is True
    assert server_status(home) is None


def test_ensure_api_reads_the_active_prefect_profile(tmp_path, no_prefect_config):
    prefect_home = Path(os.environ["PREFECT_HOME"])
    prefect_home.mkdir(parents=True)
    (prefect_home / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    with pytest.raises(CruijffError, match=r"profile 'team'.*unreachable"):
        ensure_api(tmp_path / "home")
