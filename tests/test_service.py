"""cruijff.service: supervising a background process, with a tiny HTTP server (no Prefect)."""

from __future__ import annotations

import json
import sys

import pytest

from cruijff import service
from cruijff.errors import CruijffError
from cruijff.service import Service

HEALTH_SERVER = """
import http.server, sys

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass

print("tiny-health-server listening", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_state_file_round_trip_and_incomplete_state(tmp_path):
    svc = Service(tmp_path / "state", name="thing", required=("pid", "url"))
    assert svc.read_state() is None
    svc.directory.mkdir()
    svc.write_state({"pid": 1, "url": "http://127.0.0.1:1"})
    assert svc.state_file == tmp_path / "state" / "thing.json"
    assert svc.read_state() == {"pid": 1, "url": "http://127.0.0.1:1"}
    assert [p.name for p in svc.directory.iterdir()] == ["thing.json"]  # no temporary left
    svc.state_file.write_text(json.dumps({"pid": 1}))  # lacks a required key
    assert svc.read_state() is None
    svc.state_file.write_text("{not json")
    assert svc.read_state() is None
    svc.remove_state()
    assert not svc.state_file.exists()


def test_spawn_check_and_terminate_a_detached_process(tmp_path):
    svc = Service(tmp_path, name="tiny", what="the tiny server")
    port = service.choose_port("127.0.0.1", None, previous=None)
    url = f"http://{service.url_host('127.0.0.1')}:{port}"
    with svc.locked(timeout=5):
        pid, offset = svc.spawn(
            [sys.executable, "-c", HEALTH_SERVER, str(port)], env={}, banner="starting tiny"
        )
    try:
        assert service.wait_healthy(url, pid=pid, timeout=30)
        state = {"pid": pid, "create_time": service.create_time(pid)}
        assert service.is_ours_and_alive(state, must_contain=["tiny-health", str(port)])
        assert not service.is_ours_and_alive(state, must_contain=["prefect"])
        assert not service.is_ours_and_alive({**state, "create_time": 1.0})  # a reused pid
        assert not service.port_free("127.0.0.1", port)
        with pytest.raises(CruijffError, match=rf"port {port} .*in use"):
            service.choose_port("127.0.0.1", port, previous=None)
        assert service.last_log_line(svc.log_file, offset) == "tiny-health-server listening"
        assert "starting tiny" in svc.log_file.read_text()
    finally:
        service.terminate(pid, timeout=10)
    assert not service.alive(pid)
    assert not service.healthy(url, timeout=1)
    assert service.health(url, timeout=1)[0] is None
    assert service.choose_port("127.0.0.1", None, previous=port, release_s=5) == port


def test_last_log_line_prefers_the_error_and_hides_the_secret(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("old run: ValueError: not this one\n")
    offset = log.stat().st_size
    with log.open("a") as fh:
        fh.write("connecting to postgresql://u:hunter2@db/x\n"
                 "OSError: cannot reach postgresql://u:hunter2@db/x\n"
                 "Application startup failed\n")
    assert service.last_log_line(log, offset, secret="hunter2") == (
        "OSError: cannot reach postgresql://u:***@db/x")
    log.write_text("useful line\nWaiting for application shutdown.\n")
    assert service.last_log_line(log, 0, noise=["Waiting for"]) == "useful line"
    assert service.last_log_line(log, 0) == "Waiting for application shutdown."
    assert service.last_log_line(tmp_path / "missing.log", 0) == ""


def test_rotate_and_url_host(tmp_path):
    log = tmp_path / "s.log"
    log.write_text("x" * 20)
    service.rotate(log, max_bytes=10)
    assert not log.exists() and (tmp_path / "s.log.1").read_text() == "x" * 20
    assert service.url_host("0.0.0.0") == "127.0.0.1"
    assert service.url_host("::1") == "[::1]"
    assert service.url_host("10.0.0.5") == "10.0.0.5"
