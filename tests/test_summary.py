"""`cruijff summary` and `cruijff progress` read records on disk (and Prefect when it answers).
Records are written here directly, as a run would leave them."""

from __future__ import annotations

import json

import pytest

from cruijff.runner import load_experiment, stage_key
from cruijff.state import StageRecord, write_record

TINY = "cruijff/tiny-llama-random"


@pytest.fixture
def experiment(cli, project, monkeypatch, tmp_path):
    """Three built trials; a: done, b: fine-tune failed, c: never ran. No Prefect server."""
    monkeypatch.setenv("CRUIJFF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens there
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model", TINY,
                 "--dataset", "d.json", "--treatments", '{"finetune.model.lora_rank": [4, 8]}',
                 "--name", "exp", cwd=project.experiments)
    assert result.code == 0, result.err
    exp = project.experiments / "exp"
    a = load_experiment(exp).trial("a")
    write_record(a.dir, StageRecord("finetune", stage_key(a, "finetune"), "done",
                                    duration_s=12.0, where="local:host:1"))
    write_record(a.dir, StageRecord("eval", stage_key(a, "eval"), "done", duration_s=8.0,
                                    where="local:host:1", metrics={"accuracy": 0.5}))
    write_record(exp / "trial-b", StageRecord(
        "finetune", "k3", "failed", attempts=2, duration_s=3.0, where="slurm:999999",
        history=[{"attempt": 1, "status": "running", "where": "slurm:999998", "error": None}],
        error="exit code 1\nTraceback (most recent call last):\n"
              "ValueError: lora_rank too big (has ['q_proj', 'v_proj'])"))
    return exp


def test_summary_shows_failures_with_their_last_lines_and_exits_1(cli, experiment):
    result = cli("summary", experiment)
    assert result.code == 1
    assert "ValueError: lora_rank too big" in result.out
    assert "trial b finetune failed" in result.out
    assert "The Prefect server is not running: this summary is from disk" in result.out
    assert "Traceback" not in result.err


def test_summary_json_has_every_trial_and_stage(cli, experiment):
    result = cli("summary", "--json", experiment)
    assert result.code == 1
    report = json.loads(result.out)
    states = {t["id"]: {s: v["state"] for s, v in t["stages"].items()} for t in report["trials"]}
    assert states == {"a": {"finetune": "done", "eval": "done"},
                      "b": {"finetune": "failed", "eval": "blocked"},
                      "c": {"finetune": "pending", "eval": "pending"}}
    b = next(t for t in report["trials"] if t["id"] == "b")["stages"]["finetune"]
    assert b["attempts"] == 2 and [s.split(":")[0] for s in b["slurm"]] == ["999998", "999999"]
    assert report["complete"] is False and report["running"] is False


def test_summary_of_selected_complete_trials_exits_0(cli, experiment):
    assert cli("summary", "--trials", "a", experiment).code == 0


def test_a_record_left_running_by_a_dead_run_is_interrupted(cli, experiment):
    write_record(experiment / "trial-c", StageRecord("finetune", "k4", "running"))
    report = json.loads(cli("summary", "--json", "--trials", "c", experiment).out)
    assert report["trials"][0]["stages"]["finetune"]["state"] == "interrupted"


def test_a_done_stage_whose_inputs_changed_is_outdated(cli, experiment):
    eval_config = experiment / "trial-a" / "eval.yaml"
    eval_config.write_text(eval_config.read_text().replace("limit: null", "limit: 3"))
    report = json.loads(cli("summary", "--json", "--trials", "a", experiment).out)
    assert report["trials"][0]["stages"]["eval"]["state"] == "outdated"


def test_progress_on_a_finished_run_prints_once(cli, experiment):
    result = cli("progress", experiment)
    assert result.code == 0
    assert "2/6" in result.out and "trial b" in result.out and "finished" not in result.out


def test_unknown_trial_is_a_clear_error(cli, experiment):
    result = cli("summary", "--trials", "a,zz", experiment)
    assert result.code == 2 and "unknown trial 'zz'" in result.err


@pytest.fixture
def measured(experiment, monkeypatch):
    """Trial a's stages as the launcher and sacct leave them (chosen figures); trial b's
    fine-tune ran out of memory after a timeout. A wide console: lines are not folded."""
    from results_support import record_usage

    from cruijff.cli import out

    monkeypatch.setattr(out, "_width", 250)
    g = 1024
    a, b = experiment / "trial-a", experiment / "trial-b"
    record_usage(a, "finetune", usage={"wall_s": 240, "cpu_s": 400, "peak_rss_mib": 3.1 * g},
                 slurm={"job_id": "41", "requested": {"mem_mib": 8 * g, "time_s": 1800},
                        "state": "COMPLETED", "max_rss_mib": 3.0 * g})
    record_usage(a, "eval", usage={"wall_s": 8, "peak_rss_mib": 900,
                                   "throughput": {"samples_per_s": 2.5}})
    record_usage(b, "finetune", outcome="OUT_OF_MEMORY",
                 usage={"wall_s": 31, "peak_rss_mib": 2.1 * g, "final": False},
                 slurm={"job_id": "999999", "requested": {"mem_mib": 2 * g, "time_s": 1800},
                        "state": "OUT_OF_MEMORY"},
                 history=[{"attempt": 1, "status": "failed", "where": "slurm:999998",
                           "error": None, "outcome": "TIMEOUT", "wall_s": 1800,
                           "requested": {"mem_mib": 2 * g, "time_s": 1800}}])
    return experiment


def test_summary_shows_what_each_stage_used_of_what_it_asked(cli, measured):
    result = cli("summary", measured)
    assert result.code == 1
    assert "compute" in result.out
    assert "finetune 3.1/8G 39% · 4m/30m 13% ▽" in result.out
    assert "eval 900M · 8s" in result.out  # local: nothing asked, used only
    assert "finetune #1 TIMEOUT at 30m/30m" in result.out
    assert "finetune OUT_OF_MEMORY at 2.1/2G" in result.out


def test_summary_json_carries_the_compute_figures(cli, measured):
    before = {p: p.read_bytes() for p in measured.glob("trial-*/.cruijff/*.json")}
    report = json.loads(cli("summary", "--json", measured).out)
    a, b = (next(t for t in report["trials"] if t["id"] == i)["stages"] for i in "ab")
    finetune = a["finetune"]["compute"]
    assert finetune["peak_rss_mib"] == pytest.approx(3.1 * 1024)
    assert finetune["asked_mem_mib"] == 8 * 1024 and finetune["asked_time_s"] == 1800
    assert finetune["mem_share"] == pytest.approx(3.1 / 8)
    assert finetune["time_share"] == pytest.approx(240 / 1800)
    assert a["eval"]["compute"]["throughput"] == {"samples_per_s": 2.5}
    assert b["finetune"]["compute"]["outcome"] == "OUT_OF_MEMORY"
    assert b["finetune"]["compute"]["final"] is False
    assert [(e["attempt"], e["outcome"]) for e in b["finetune"]["compute_earlier"]] == [
        (1, "TIMEOUT")]
    assert {p: p.read_bytes() for p in measured.glob("trial-*/.cruijff/*.json")} == before


def test_records_without_figures_add_no_compute_column(cli, experiment, monkeypatch):
    from cruijff.cli import out

    monkeypatch.setattr(out, "_width", 250)
    assert "compute" not in cli("summary", experiment).out
