"""The trial pipeline alone (cruijff.pipeline, cruijff.runner): no Prefect server, no Dask.

Stages here are the test doubles `testing_touch` (writes one file, can wait for a file, fail,
or fail once) and `testing_shared` (the same, shared between trials with equal keys), run as
real subprocesses by `run_in_process`, the seam's in-process side.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from cruijff.errors import CruijffError
from cruijff.experiment import ARCHIVE
from cruijff.pipeline import RunPlan, run_in_process
from cruijff.runner import STOP, load_experiment, pending, request_stop, trial_states
from cruijff.state import read_record

TOUCH, SHARED = "testing_touch", "testing_shared"


@pytest.fixture
def make(doubles):
    """build(pipeline, treatments) -> the experiment folder, built by the real CLI."""

    def build(pipeline: list[str], treatments: list[dict], name: str = "exp",
              retries: int = 1) -> Path:
        return doubles(pipeline, treatments, name, f"orchestration: {{retries: {retries}}}\n")

    return build


def outcomes(exp: Path, **options) -> dict[str, dict[str, str]]:
    return run_in_process(RunPlan.make(exp, workers=2, **options))


def test_every_stage_runs_once_and_a_second_run_skips_them(make):
    exp = make([TOUCH], [{f"{TOUCH}.index": 1}, {f"{TOUCH}.index": 2}])
    assert outcomes(exp) == {"a": {TOUCH: "done"}, "b": {TOUCH: "done"}}
    runs = {t: read_record(exp / f"trial-{t}", TOUCH).run_id for t in "ab"}
    assert (exp / "trial-b" / "touch" / "output.txt").read_text() == "b 2\n"
    assert RunPlan.make(exp).todo() == []
    assert outcomes(exp) == {"a": {TOUCH: "skipped"}, "b": {TOUCH: "skipped"}}
    assert {t: read_record(exp / f"trial-{t}", TOUCH).run_id for t in "ab"} == runs


def test_a_failure_stops_its_trial_only_after_its_retries(make):
    exp = make([TOUCH, SHARED], [{f"{TOUCH}.index": 1}, {f"{TOUCH}.exit_code": 3}],
               retries=2)
    assert outcomes(exp) == {"a": {TOUCH: "done", SHARED: "done"}, "b": {TOUCH: "failed"}}
    failed = read_record(exp / "trial-b", TOUCH)
    assert (failed.status, failed.attempts, len(failed.history)) == ("failed", 3, 2)
    assert "exit code 3" in failed.error
    assert read_record(exp / "trial-b", SHARED) is None  # never started
    states = trial_states(load_experiment(exp).trial("b"), [TOUCH, SHARED], held=False)
    assert [s.state for s in states.values()] == ["failed", "blocked"]


def test_a_stage_that_fails_once_is_retried_and_done(make, tmp_path):
    exp = make([TOUCH], [{f"{TOUCH}.fail_once": str(tmp_path / "failed-once")}])
    assert outcomes(exp) == {"a": {TOUCH: "done"}}
    record = read_record(exp / "trial-a", TOUCH)
    assert (record.status, record.attempts, record.history[0]["status"]) == ("done", 2, "failed")


def test_equal_shared_stages_run_once_and_the_others_link(make):
    exp = make([SHARED, TOUCH], [{f"{TOUCH}.index": i} for i in range(3)])
    assert outcomes(exp) == {"a": {SHARED: "done", TOUCH: "done"},
                             "b": {SHARED: "reused", TOUCH: "done"},
                             "c": {SHARED: "reused", TOUCH: "done"}}
    for trial in "bc":
        record = read_record(exp / f"trial-{trial}", SHARED)
        assert (record.status, record.reused_from) == ("reused", "a")
        assert (exp / f"trial-{trial}" / "shared").resolve() == exp / "trial-a" / "shared"
    assert read_record(exp / "trial-b", SHARED).run_id == read_record(exp / "trial-a",
                                                                        SHARED).run_id


def test_a_shared_stage_whose_owner_fails_is_run_by_the_trial_waiting_for_it(make, tmp_path):
    """Equal keys: a owns the shared stage and fails it (no retries; it fails only once);
    b, which waited for a, then runs the stage itself instead of linking to nothing."""
    exp = make([SHARED, TOUCH], [{f"{SHARED}.fail_once": str(tmp_path / "once"),
                                  f"{TOUCH}.index": i} for i in (1, 2)], retries=0)
    assert outcomes(exp) == {"a": {SHARED: "failed"}, "b": {SHARED: "done", TOUCH: "done"}}
    assert read_record(exp / "trial-b", SHARED).reused_from is None


def test_a_stop_request_interrupts_running_stages_and_starts_no_more(make, tmp_path):
    release = tmp_path / "never"
    exp = make([TOUCH, SHARED], [{f"{TOUCH}.wait_for": str(release)}])
    plan = RunPlan.make(exp)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_in_process(plan)))
    runner.start()
    deadline = time.monotonic() + 60
    while (r := read_record(exp / "trial-a", TOUCH)) is None or r.status != "running":
        assert time.monotonic() < deadline and runner.is_alive(), "the stage never started"
        time.sleep(0.05)
    request_stop("test")
    runner.join(timeout=60)
    assert not runner.is_alive()
    assert result == {"a": {TOUCH: "failed"}}
    assert read_record(exp / "trial-a", TOUCH).status == "interrupted"
    assert read_record(exp / "trial-a", SHARED) is None
    STOP.clear()
    release.touch()
    assert outcomes(exp) == {"a": {TOUCH: "done", SHARED: "done"}}


def test_force_archives_the_selected_stages_and_runs_them_again(make):
    exp = make([SHARED, TOUCH], [{f"{TOUCH}.index": 1}, {f"{TOUCH}.index": 2}])
    outcomes(exp)
    before = read_record(exp / "trial-b", TOUCH).run_id
    result = outcomes(exp, force=True, trials="b")
    assert result == {"b": {SHARED: "reused", TOUCH: "done"}}
    assert read_record(exp / "trial-b", TOUCH).run_id != before
    [archive] = (exp / ARCHIVE).iterdir()
    moved = archive / "trial-b"
    assert json.loads((moved / ".cruijff" / f"{TOUCH}.json").read_text())["run_id"] == before
    assert (moved / "shared").is_symlink()  # the link to a's shared run, not a's files
    assert (exp / "trial-a" / "shared" / "output.txt").read_text() == "shared 0\n"


def test_failed_selects_the_trials_with_a_failed_stage(make):
    exp = make([TOUCH], [{f"{TOUCH}.index": 1}, {f"{TOUCH}.exit_code": 2}], retries=0)
    assert RunPlan.make(exp, failed=True).note == "Experiment exp has no failed trials."
    outcomes(exp)
    plan = RunPlan.make(exp, failed=True)
    assert ([t.id for t, _ in plan.selection], plan.trials) == (["b"], "b")
    with pytest.raises(CruijffError, match="drop --trials"):
        RunPlan.make(exp, failed=True, trials="a")
    with pytest.raises(CruijffError, match="--executor must be local or slurm"):
        RunPlan.make(exp, executor="kubernetes")
    with pytest.raises(CruijffError, match="unknown trial 'z'"):
        RunPlan.make(exp, trials="z")


def test_every_view_reads_done_the_same_way(make, cli):
    """A damaged output: the run's todo, summary and the results table all say so."""
    exp = make([TOUCH], [{f"{TOUCH}.index": 1}, {f"{TOUCH}.index": 2}])
    outcomes(exp)
    (exp / "trial-b" / "touch" / "output.txt").write_text("b 2 and more\n")
    experiment = load_experiment(exp)
    assert [(t.id, s) for t, s in pending([(t, t.stages) for t in experiment.trials])] == [
        ("b", TOUCH)]
    summary = json.loads(cli("summary", "--json", exp).out)
    assert {t["id"]: t["stages"][TOUCH]["state"] for t in summary["trials"]} == {
        "a": "done", "b": "damaged"}
    from cruijff.cli import _results

    _, rows, all_done = _results([(t, t.stages) for t in experiment.trials], held=False)
    assert [r["stages"][TOUCH] for r in rows] == ["done", "damaged"] and not all_done


def test_the_test_doubles_are_refused_in_a_users_pipeline(cli, project, monkeypatch):
    monkeypatch.delenv("CRUIJFF_TEST_DOUBLES")
    project.config.write_text(project.config.read_text() + f"pipeline: [{TOUCH}]\n")
    result = cli("build", "--config-path", project.config, "--task", "toy", "--model",
                 "cruijff/tiny-llama-random", "--dataset", "d.json", "--name", "x",
                 "--root", project.experiments)
    assert result.code == 2
    assert f"pipeline: stage '{TOUCH}' is a test double of cruijff's own tests" in result.err
    assert not (project.experiments / "x").exists()


def test_a_stage_lost_before_it_started_is_submitted_again_without_using_a_retry(make):
    """Dask may queue a stage on a busy worker; when that worker is lost (its job cancelled
    for the other stage's sake), the waiting stage never ran: that is not its attempt."""
    from cruijff.pipeline import Sharing, run_trial
    from cruijff.runner import execute_stage

    exp = make([TOUCH], [{f"{TOUCH}.index": 1}], retries=0)
    experiment = load_experiment(exp)
    trial = experiment.trial("a")
    calls = []

    def submit(trial, stage, key, attempt, grown=None):
        calls.append(attempt)
        if len(calls) == 1:
            return False  # lost on the way: the stage did not start
        return execute_stage(trial, stage, key).is_done

    outcome = run_trial(experiment, trial, [TOUCH], submit,
                        sharing=Sharing([(trial, [TOUCH])]), retries=0)
    assert outcome == {TOUCH: "done"} and calls == [1, 1]
    assert read_record(exp / "trial-a", TOUCH).attempts == 1


def test_a_stage_that_started_and_failed_uses_its_retries(make):
    exp = make([TOUCH], [{f"{TOUCH}.exit_code": 4}], retries=1)
    experiment = load_experiment(exp)
    calls = []

    def submit(trial, stage, key, attempt, grown=None):
        calls.append(attempt)
        from cruijff.runner import execute_stage

        return execute_stage(trial, stage, key).is_done

    from cruijff.pipeline import Sharing, run_trial

    trial = experiment.trial("a")
    assert run_trial(experiment, trial, [TOUCH], submit, sharing=Sharing([(trial, [TOUCH])]),
                     retries=1) == {TOUCH: "failed"}
    assert calls == [1, 2]


def run_trial_a_stopped(make, submit) -> tuple[Path, dict[str, str]]:
    """Trial a of a new two-stage experiment through `submit` (which stops the run), held
    as a run holds it; the experiment and the trial's outcome."""
    from cruijff.pipeline import hold, run_trial

    exp = make([TOUCH, SHARED], [{f"{TOUCH}.index": 1}])
    plan = RunPlan.make(exp)
    try:
        with hold(plan) as sharing:
            trial = plan.experiment.trial("a")
            outcome = run_trial(plan.experiment, trial, [TOUCH, SHARED], submit,
                                sharing=sharing, retries=1)
    finally:
        STOP.clear()
    return exp, outcome


def test_a_stage_its_dying_worker_recorded_failed_after_a_stop_is_interrupted(make):
    """On Slurm, cancelling a stopped run's jobs signals the stage too, and its worker may
    write 'failed' before it dies: once the workers are gone the run records 'interrupted'."""
    from cruijff.state import StageRecord, now, write_record

    def submit(trial, stage, key, attempt, grown=None):
        request_stop("test")  # Ctrl-C while the stage ran in its worker job
        write_record(trial.dir, StageRecord(stage, key, "failed", finished=now(),
                                            error="exit code -15"))
        return False

    exp, outcome = run_trial_a_stopped(make, submit)
    assert outcome == {TOUCH: "failed"}
    record = read_record(exp / "trial-a", TOUCH)
    assert (record.status, record.error) == ("interrupted",
                                             "stopped by the user: `cruijff run` runs it again")
    assert read_record(exp / "trial-a", SHARED) is None


def test_a_stage_that_finished_as_the_user_stopped_is_done_and_its_trial_completes(make):
    """The stop can land between a stage's end and the orchestrator hearing of it (CI saw
    a Prefect subflow cancelled whose only stage was done): a finished attempt counts, and
    no later stage starts."""
    from cruijff.pipeline import trial_ending
    from cruijff.runner import execute_stage

    calls = []

    def submit(trial, stage, key, attempt, grown=None):
        calls.append(stage)
        done = execute_stage(trial, stage, key).is_done
        request_stop("test")  # Ctrl-C as the stage's result travels back
        return done

    exp, outcome = run_trial_a_stopped(make, submit)
    assert (outcome, calls) == ({TOUCH: "done"}, [TOUCH]), "a stage started after the stop"
    assert trial_ending(outcome, [TOUCH]) == "completed"  # its subflow completes
    assert read_record(exp / "trial-a", SHARED) is None
    assert read_record(exp / "trial-a", TOUCH).status == "done"


@pytest.mark.parametrize(("outcome", "stopped", "ending"), [
    ({TOUCH: "done", SHARED: "reused"}, True, "completed"),  # stopped after it finished
    ({TOUCH: "skipped", SHARED: "done"}, False, "completed"),
    ({TOUCH: "done"}, True, "stopped"),
    ({TOUCH: "failed"}, True, "stopped"),
    ({TOUCH: "done", SHARED: "failed"}, False, "failed"),
])
def test_how_a_trial_ended(outcome, stopped, ending):
    from cruijff.pipeline import trial_ending

    stop = threading.Event()
    if stopped:
        stop.set()
    assert trial_ending(outcome, [TOUCH, SHARED], stop) == ending
