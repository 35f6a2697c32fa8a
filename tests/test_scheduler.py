"""Which work runs when (cruijff.pipeline.Places): a trial waiting for another's shared stage
holds no place, so runnable work never queues behind it. No Prefect, no Dask: the pipeline
alone, stages as real subprocesses of `run_in_process` (tests/test_prefect_scheduler.py runs
the same shape through Prefect).

Stages wait for files the test creates, so every ordering asserted here is caused, not timed:
the owner of the shared stage cannot finish before the test lets it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from cruijff.pipeline import Places, RunPlan, run_in_process
from cruijff.runner import STOP, request_stop
from cruijff.state import read_record

TOUCH, SHARED = "testing_touch", "testing_shared"
DEADLINE_S = 120


def wait_until(check, what: str, runner: threading.Thread) -> None:
    """Poll `check` until it holds; fail naming `what` if the run ends or the deadline passes."""
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert runner.is_alive(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def status(exp: Path, trial: str, stage: str) -> str | None:
    record = read_record(exp / f"trial-{trial}", stage)
    return None if record is None else record.status


def start(exp: Path, workers: int) -> tuple[threading.Thread, dict]:
    result: dict = {}
    plan = RunPlan.make(exp, workers=workers)
    runner = threading.Thread(target=lambda: result.update(run_in_process(plan)))
    runner.start()
    return runner, result


def test_trials_waiting_for_a_shared_stage_leave_the_workers_to_runnable_ones(doubles,
                                                                              tmp_path):
    """Two workers. a, b and c share one stage, a runs it and cannot finish until the test
    releases it; d's is its own. With b and c waiting in worker places (as before), d could
    not start until a ended; now d runs to the end beside a."""
    release = tmp_path / "release"
    exp = doubles([SHARED, TOUCH], [
        *({f"{SHARED}.wait_for": str(release), f"{TOUCH}.index": i} for i in (1, 2, 3)),
        {f"{SHARED}.index": 9, f"{TOUCH}.index": 4}])
    runner, result = start(exp, workers=2)
    try:
        wait_until(lambda: status(exp, "d", TOUCH) == "done", "d finished", runner)
        assert status(exp, "a", SHARED) == "running"
        assert status(exp, "b", SHARED) is None and status(exp, "c", SHARED) is None
    finally:
        release.touch()
        runner.join(timeout=DEADLINE_S)
    assert not runner.is_alive()
    assert result == {"a": {SHARED: "done", TOUCH: "done"},
                      "b": {SHARED: "reused", TOUCH: "done"},
                      "c": {SHARED: "reused", TOUCH: "done"},
                      "d": {SHARED: "done", TOUCH: "done"}}


def test_a_shared_stage_its_owner_already_finished_does_not_hold_its_waiters(doubles):
    """a (the owner: first in order) finished the shared stage in an earlier run (`--trials
    a`, or by hand); a run of all trials skips it for a, and b links a's run (before: b
    waited for ever for a run that a, skipping, never made)."""
    exp = doubles([SHARED, TOUCH], [{f"{TOUCH}.index": 1}, {f"{TOUCH}.index": 2}])
    assert run_in_process(RunPlan.make(exp, trials="a", workers=1)) == {
        "a": {SHARED: "done", TOUCH: "done"}}
    runner, result = start(exp, workers=2)
    runner.join(timeout=DEADLINE_S)  # a guard against the hang, not a measurement
    assert not runner.is_alive(), "trial b still waits for a's shared stage"
    assert result == {"a": {SHARED: "skipped", TOUCH: "skipped"},
                      "b": {SHARED: "reused", TOUCH: "done"}}


def test_one_worker_runs_one_stage_at_a_time_in_trial_order(doubles, tmp_path):
    """One worker: b's stage waits for a file the test creates only once a's is running, so
    b cannot have started first or beside a (a place is a worker)."""
    gate = tmp_path / "gate"
    exp = doubles([TOUCH], [{f"{TOUCH}.wait_for": str(gate)}, {f"{TOUCH}.index": 2}])
    runner, result = start(exp, workers=1)
    try:
        wait_until(lambda: status(exp, "a", TOUCH) == "running", "a running", runner)
        assert status(exp, "b", TOUCH) is None
    finally:
        gate.touch()
        runner.join(timeout=DEADLINE_S)
    assert result == {"a": {TOUCH: "done"}, "b": {TOUCH: "done"}}


def test_a_stop_while_trials_wait_for_a_place_starts_none_of_them(doubles, tmp_path):
    never = tmp_path / "never"
    exp = doubles([TOUCH], [{f"{TOUCH}.wait_for": str(never)}, {f"{TOUCH}.index": 2},
                            {f"{TOUCH}.index": 3}])
    runner, result = start(exp, workers=1)
    try:
        wait_until(lambda: status(exp, "a", TOUCH) == "running", "a running", runner)
        request_stop("test")
        runner.join(timeout=DEADLINE_S)
        assert not runner.is_alive()
    finally:
        STOP.clear()
    assert result == {"a": {TOUCH: "failed"}, "b": {}, "c": {}}
    assert status(exp, "a", TOUCH) == "interrupted"
    assert status(exp, "b", TOUCH) is None and status(exp, "c", TOUCH) is None


def test_a_freed_place_goes_to_a_returning_trial_before_a_new_one():
    """Places alone: one place, held; trial 3 queues as new, trial 7 as coming back from a
    wait. The freed place goes to 7 although 3 asked first and comes earlier in order."""
    places = Places(1, stop=threading.Event())
    places.take((Places.NEW, 0))
    order: list[int] = []

    def take(rank: tuple[int, int]) -> None:
        places.take(rank)
        order.append(rank[1])
        places.give()

    new = threading.Thread(target=take, args=((Places.NEW, 3),))
    new.start()
    wait_queued(places, 1)
    back = threading.Thread(target=take, args=((Places.RETURNING, 7),))
    back.start()
    wait_queued(places, 2)
    places.give()
    new.join(timeout=10)
    back.join(timeout=10)
    assert order == [7, 3]


def wait_queued(places: Places, count: int) -> None:
    """Until `count` takers wait in the queue (they queue under its lock before waiting)."""
    deadline = time.monotonic() + 10
    while len(places._queue) < count:
        assert time.monotonic() < deadline
        time.sleep(0.01)
