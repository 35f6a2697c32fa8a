"""cruijff's flow runs send no Prefect heartbeats unless the user asked for them: a finishing
flow run waits for its heartbeat thread's 1 s sleep (0.5 s on average, per trial and again for
the experiment), and cruijff finds runs whose process died by its run lock instead."""

from __future__ import annotations

from cruijff.flows.experiment import no_heartbeats
from prefect.settings import get_current_settings


def test_flow_runs_started_inside_send_no_heartbeats(monkeypatch):
    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    before = get_current_settings().flows.heartbeat_frequency
    with no_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == before


def test_a_frequency_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
    before = get_current_settings().flows.heartbeat_frequency
    with no_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency == before
