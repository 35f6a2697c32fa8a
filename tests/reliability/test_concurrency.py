"""Concurrency (issue 7, part 4): two builds of one name, `build --force` under a run, and
`summary` / `analyze` while a run writes (and two `analyze` at once).

Builds and analyses run as real `python -m cruijff` processes. Where a race would depend on
timing, the test holds the lock itself (fcntl, as another cruijff would), or holds one side
inside its store transaction while the other runs to its end without ever waiting for a lock,
so the outcome is certain and broken isolation fails every time, however fast or slow the
machine; one test per case also starts the processes genuinely at once.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import cruijff, make_site
from postgres_support import fresh_database
from results_support import SyntheticTrial, make_experiment, write_eval_log_file
from sqlalchemy import event

from cruijff.errors import CruijffError
from cruijff.experiment import ARCHIVE, experiment_config
from cruijff.report import CSV_COLUMNS, compute_analysis
from cruijff.runner import load_experiment, run_lock
from cruijff.state import StageRecord, read_record, write_record
from cruijff.store import load_experiment_results, open_store

TINY = "cruijff/tiny-llama-random"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


# ---------------------------------------------------------------------------------------------
# cruijff build of a name that is being built


def build_args(project, name: str, *extra: str) -> list[str]:
    return ["build", "--config-path", str(project.config), "--task", "toy", "--model", TINY,
            "--dataset", "d.json", "--treatment", "torchtune.model.lora_rank=4",
            "--root", str(project.experiments), "--name", name, *extra]


def start_build(project, name: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cruijff", *build_args(project, name, *extra)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error_line(stderr: str) -> str:
    """The refusal: exactly one line, `error: ...`, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def assert_intact(path: Path) -> None:
    """A complete experiment: its config.yaml readable, every trial folder with its files."""
    config = experiment_config(path)
    assert config["name"] == path.name
    for trial in load_experiment(path).trials:
        for name in ("config.yaml", *(f"{s}.{ext}" for s in trial.stages
                                       for ext in ("yaml", "slurm"))):
            assert (trial.dir / name).is_file(), trial.dir / name
    assert len(config["trials"]) == 2


def hidden_leftovers(root: Path) -> list[str]:
    """Staging folders and lock files left in the experiment root."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ARCHIVE)


def hold(path: Path, content: dict) -> object:
    """Open and flock `path` as a cruijff process would, writing its holder line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+", encoding="utf-8")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.truncate(0)
    handle.write(json.dumps(content))
    handle.flush()
    return handle


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_a_build_of_a_name_being_built_is_refused(project, force):
    """Another cruijff holds the build lock of `exp` (here: this test): the build is refused
    with one line naming its pid, and writes nothing; once it is free the build goes on."""
    root = project.experiments
    extra = ["--force"] if force else []
    if force:
        assert cruijff(*build_args(project, "exp"), env=ENV).returncode == 0
        before = (root / "exp" / "config.yaml").read_text()
    handle = hold(root / ".exp.build.lock", {"pid": os.getpid(), "host": os.uname().nodename})
    try:
        result = cruijff(*build_args(project, "exp", *extra), env=ENV)
    finally:
        handle.close()
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_error_line(result.stderr)
    assert f"experiment exp is being built by another cruijff (pid {os.getpid()}): wait" in line
    assert hidden_leftovers(root) == [".exp.build.lock"]  # the holder's own file, untouched
    if force:  # the existing experiment is neither archived nor changed
        assert (root / "exp" / "config.yaml").read_text() == before
        assert not (root / ARCHIVE).exists()
    else:
        assert not (root / "exp").exists()

    again = cruijff(*build_args(project, "exp", *extra), env=ENV)
    assert again.returncode == 0, again.stderr
    assert_intact(root / "exp")
    assert hidden_leftovers(root) == []  # the lock file goes with the build that held it
    assert len(list((root / ARCHIVE).iterdir()) if force else []) == int(force)


def test_two_builds_at_once_one_wins(project):
    """Three real builds of one name started together, several times: exactly one wins, the
    others exit 2 with one line; the winner's experiment is complete; nothing is left over."""
    root = project.experiments
    for round_ in range(6):
        name = f"race{round_}"
        procs = [start_build(project, name) for _ in range(3)]
        outcomes = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
        winners = [o for o in outcomes if o[0] == 0]
        assert len(winners) == 1, outcomes
        for code, _, err in outcomes:
            if code != 0:
                assert code == 2, err
                line = one_error_line(err)
                assert ("already exists: pass --force" in line
                        or f"experiment {name} is being built by another cruijff (pid " in line)
        assert_intact(root / name)
    assert hidden_leftovers(root) == []
    assert not (root / ARCHIVE).exists()


def test_force_builds_at_once_never_lose_an_experiment(project):
    """Three `build --force` of an existing experiment started together: each either builds
    (and archives the one before it) or is refused in one line; every replaced experiment is
    in the archive, complete, and the final one is complete."""
    root = project.experiments
    assert cruijff(*build_args(project, "exp"), env=ENV).returncode == 0
    successes = 0
    for _ in range(4):
        procs = [start_build(project, "exp", "--force") for _ in range(3)]
        for proc in procs:
            code, err = proc.wait(timeout=120), proc.stderr.read()
            if code == 0:
                successes += 1
            else:
                assert code == 2, err
                assert "experiment exp is being built by another cruijff (pid " in \
                    one_error_line(err)
    assert successes >= 4  # at least one per round
    archived = sorted((root / ARCHIVE).iterdir())
    assert len(archived) == successes  # each build archived exactly the one before it
    for folder in archived:
        assert experiment_config(folder)["name"] == "exp"
    assert_intact(root / "exp")
    assert hidden_leftovers(root) == []


def test_force_refuses_while_a_run_holds_the_experiment(project):
    """`build --force` of an experiment that a `cruijff run` is running (its run lock held,
    by runner.run_lock itself) refuses in one line instead of archiving it from under the run."""
    root = project.experiments
    assert cruijff(*build_args(project, "exp"), env=ENV).returncode == 0
    before = (root / "exp" / "config.yaml").read_text()
    with run_lock(load_experiment(root / "exp")):
        result = cruijff(*build_args(project, "exp", "--force"), env=ENV)
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_error_line(result.stderr)
    assert f"experiment exp is being run by `cruijff run` (pid {os.getpid()})" in line
    assert (root / "exp" / "config.yaml").read_text() == before
    assert not (root / ARCHIVE).exists() and hidden_leftovers(root) == []

    after = cruijff(*build_args(project, "exp", "--force"), env=ENV)  # the run is over
    assert after.returncode == 0, after.stderr
    assert len(list((root / ARCHIVE).iterdir())) == 1
    assert_intact(root / "exp")


def test_a_killed_build_leaves_nothing_the_next_build_trips_on(cli, project):
    """What `kill -9` of a build leaves (its staging folder, its unlocked lock file) is cleared
    by the next build of that name; another name's staging folder is not touched."""
    root = project.experiments
    (root / ".exp.building-ab12cd34" / "trial-a").mkdir(parents=True)
    (root / ".exp.build.lock").write_text('{"pid": 999999}')
    other = root / ".exp2.building-ab12cd34"
    other.mkdir()
    result = cli(*build_args(project, "exp"))
    assert result.code == 0, result.err
    assert hidden_leftovers(root) == [other.name]
    assert_intact(root / "exp")


# ---------------------------------------------------------------------------------------------
# analyze: two at once, and reads that never see half of a load


SCORES = [1, 0, 1, 1, 0, 1, 1, 0] * 25


def synthetic(path: Path) -> Path:
    return make_experiment(path, [
        SyntheticTrial("a", scores=SCORES, losses=[2.0, 1.0, 0.5]),
        SyntheticTrial("b", scores=SCORES[::-1], control="a", treatment={"eval.x": 1}),
        SyntheticTrial("c", control="a", treatment={"eval.x": 2}, eval_status="running"),
    ])


def trial_results(stdout: str) -> list[dict]:
    return [{k: t.get(k) for k in ("id", "status", "metric", "vs_control")}
            for t in json.loads(stdout)["trials"]]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_analyzes_at_once_all_succeed_with_the_same_result(tmp_path, backend):
    """Four `cruijff analyze` of one experiment at once, on a new store and again on the
    existing one: all exit 0 with the same numbers (no "database is locked", no half-created
    tables); the report files are whole."""
    experiment = synthetic(tmp_path / "exp")
    rounds = 2
    with store_url(backend, experiment) as url:
        env = dict(ENV, CRUIJFF_DATABASE_URL=url)
        results = []
        for round_ in range(rounds):
            if backend == "sqlite" and round_ < rounds - 1:
                Path(url.removeprefix("sqlite:///")).unlink(missing_ok=True)  # a new store
            procs = [subprocess.Popen([sys.executable, "-m", "cruijff", "analyze", "--json",
                                       str(experiment)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(4)]
            for proc in procs:
                out, err = proc.communicate(timeout=180)
                assert proc.returncode == 0, err
                assert "locked" not in err and "Traceback" not in err
                results.append(trial_results(out))
    assert all(r == results[0] for r in results)
    assert [t["status"] for t in results[0]] == ["ok", "ok", "running"]
    assert_report_whole(experiment / "report")


def never_waits(store) -> None:
    """The store's SQLite transactions give up at once ("database is locked") where they
    would wait for another's lock (busy_timeout 0): a test can then run it to its end while
    holding another transaction open, and no timeout decides what it observes."""
    event.listen(store.engine, "checkout",
                 lambda dbapi_connection, *_: dbapi_connection.execute("PRAGMA busy_timeout=0"))


def test_a_load_is_kept_out_of_another_load_in_progress(tmp_path):
    """Two loads of one experiment at once (what two `analyze` do; the test above starts
    them genuinely together, where they may or may not overlap): the second cannot run a
    statement while the first's transaction is open, so neither sees the other's half-done
    rows nor fails when it comes to write (SQLite refuses to let a reader wait for a writer
    that waits for it). The overlap is certain: the first load is held inside its
    transaction, after its first query, until the second has run to its end; the second
    never waits for a lock, so it is kept out at once or gets in, whatever the machine's
    speed, and getting in fails this test."""
    experiment = synthetic(tmp_path / "exp")
    with open_store(None, experiment) as first, open_store(None, experiment) as second:
        load_experiment_results(first, experiment)  # rows to replace: the load reads first
        never_waits(second)
        ran: list[str] = []  # statements the second load ran inside the first's transaction
        outcome: list[str] = []

        def second_load() -> None:
            try:
                load_experiment_results(second, experiment)
                outcome.append("loaded")
            except CruijffError as exc:
                outcome.append(str(exc))

        other = threading.Thread(target=second_load)

        def note(_conn, _cursor, statement, *_args) -> None:
            ran.append(statement)

        def hold_first(_conn, _cursor, statement, *_args) -> None:
            if statement.lstrip().upper().startswith("SELECT") and other.ident is None:
                event.listen(second.engine, "after_cursor_execute", note)
                other.start()
                other.join(timeout=120)  # it never waits on a lock: this is a hang guard
                assert not other.is_alive(), "the second load hung"
                event.remove(second.engine, "after_cursor_execute", note)

        event.listen(first.engine, "after_cursor_execute", hold_first)
        load_experiment_results(first, experiment)
        event.remove(first.engine, "after_cursor_execute", hold_first)
        assert other.ident is not None, "the first load ran no query: nothing was held"
        assert ran == [], f"the second load ran inside the first's transaction: {ran}"
        assert len(outcome) == 1 and "locked" in outcome[0], outcome
        load_experiment_results(second, experiment)  # once the first is done, it goes in
        analysis = compute_analysis(first, experiment)
    assert [(t.id, t.status) for t in analysis.trials] == [("a", "ok"), ("b", "ok"),
                                                           ("c", "running")]


@contextmanager
def store_url(backend: str, experiment: Path) -> Iterator[str]:
    """The results store to use: the default SQLite file, or a new PostgreSQL database."""
    if backend == "sqlite":
        yield f"sqlite:///{experiment / 'results.sqlite'}"
    else:
        with fresh_database() as db:
            yield db.url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_stores_opened_at_once_on_a_new_database_all_open(tmp_path, backend):
    """Six `open_store` at once on a new database (what six `analyze` do first): all open it;
    none fails on tables another is creating ("table ... already exists")."""
    rounds = 10 if backend == "sqlite" else 1
    for round_ in range(rounds):
        experiment = tmp_path / f"exp{round_}"
        experiment.mkdir()
        with store_url(backend, experiment) as url:
            barrier, errors = threading.Barrier(6), []

            def open_it(url: str = url, barrier: threading.Barrier = barrier,
                        errors: list = errors) -> None:
                barrier.wait()
                try:
                    open_store(url).close()
                except Exception as exc:  # collected, and shown by the assert below
                    errors.append(str(exc))

            threads = [threading.Thread(target=open_it) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert errors == []


def report_problems(folder: Path) -> list[str]:
    """Whatever makes the report files in `folder` not whole (none there is fine)."""
    problems = []
    checks = {"report.md": lambda t: t.startswith("# ") and t.endswith(
                  "Plots: report.html. Numbers: results.csv.\n"),
              "report.html": lambda t: t.startswith("<!DOCTYPE html>") and t.endswith(
                  "</html>\n"),
              "results.csv": lambda t: t.endswith("\n") and tuple(next(csv.reader(
                  t.splitlines()), ())) == CSV_COLUMNS}
    for name, whole in checks.items():
        try:
            text = (folder / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        if not whole(text):
            problems.append(f"{name}: {text[:80]!r} ... {text[-80:]!r}")
    return problems


def assert_report_whole(folder: Path) -> None:
    assert (folder / "report.md").is_file()
    assert report_problems(folder) == []


def test_a_read_never_sees_half_of_another_load(tmp_path):
    """compute_analysis reads the store while another writer loads a newer state (trial c's
    eval went from running, with its log half-written, to done) between two of its queries:
    it sees the old state or the new one, never c's samples with c still 'running'.

    The load runs to its end, held nowhere by the test, while the read waits between its
    queries; the writer never waits for a lock (busy_timeout 0), so either the read's
    isolation keeps it out at once ("database is locked") or it commits before the read goes
    on. No timeout decides which, so a read that is not isolated fails this test every time,
    however fast or slow the machine."""
    experiment = synthetic(tmp_path / "exp")
    trial_c = experiment / "trial-c"
    log = "logs/eval/2026-01-01T00-00-00+00-00_capitalization_c.eval"
    write_eval_log_file(trial_c / log, SCORES)
    whole = (trial_c / log).read_bytes()
    (trial_c / log).write_bytes(whole[: len(whole) // 2])  # Inspect is still writing it
    with open_store(None, experiment) as store, open_store(None, experiment) as other:
        load_experiment_results(store, experiment)
        never_waits(other)
        outcome: list[str] = []

        def newer_load() -> None:
            (trial_c / log).write_bytes(whole)
            write_record(trial_c, StageRecord("eval", "eval-key", "done", outputs=[log],
                                              metrics={"samples": len(SCORES)}))
            try:
                load_experiment_results(other, experiment)
                outcome.append("loaded")
            except CruijffError as exc:  # kept out by the read's transaction
                outcome.append(str(exc))

        writer = threading.Thread(target=newer_load)

        def between_queries(_conn, _cursor, statement, *_args) -> None:
            if "FROM samples" in statement and writer.ident is None:
                writer.start()
                writer.join(timeout=120)  # it never waits on a lock: this is a hang guard
                assert not writer.is_alive(), "the writer hung"

        event.listen(store.engine, "before_cursor_execute", between_queries)
        first = compute_analysis(store, experiment)
        event.remove(store.engine, "before_cursor_execute", between_queries)
        assert outcome == ["loaded"] or (len(outcome) == 1 and "locked" in outcome[0]), outcome
        c = next(t for t in first.trials if t.id == "c")
        assert (c.status, c.has_results) == ("running", False), (c.status, c.estimate)
        load_experiment_results(store, experiment)  # (again, if it was kept out)
        second = compute_analysis(store, experiment)
    assert [(t.id, t.status) for t in second.trials] == [("a", "ok"), ("b", "ok"), ("c", "ok")]


# ---------------------------------------------------------------------------------------------
# summary and analyze while a real run writes


def at_once(commands: list[tuple], env: dict) -> list[subprocess.CompletedProcess]:
    """Start the `cruijff` commands together; their outcomes, in order."""
    procs = [subprocess.Popen([sys.executable, "-m", "cruijff", *map(str, args)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in commands]
    results = []
    for args, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=180)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


@pytest.mark.slow
def test_summary_and_analyze_while_a_run_writes(tmp_path, tiny_random_model, prefect_env):
    """A real `cruijff run` (base-model evals of two trials, one after the other) and, until
    it ends, `summary --json` and `analyze --json` in a loop, while a thread reads the report
    files: every call exits 0/1 (summary) or 0/2-with-"has no results yet" (analyze) with
    valid JSON and no traceback; nothing is reported done (or analyzed) that its record does
    not say is done; no report file is ever seen half-written."""
    site = make_site(tmp_path, tiny_random_model)
    exp = site / "live"
    built = cruijff("build", "--config-path", site / "config.yaml", "--root", site,
                    "--name", "live", "--task", "capitalization",
                    "--dataset", "words_5L_80_1000.json", "--model", TINY,
                    "--control", "use_fine_tune=false", "--control", "eval.limit=3",
                    "--treatment", "eval.limit=2", env=prefect_env)
    assert built.returncode == 0, built.stderr
    trials = {t.id: t.dir for t in load_experiment(exp).trials}

    stop, torn = threading.Event(), []

    def read_reports() -> None:
        while not stop.is_set():
            torn.extend(report_problems(exp / "report"))
            time.sleep(0.02)

    reader = threading.Thread(target=read_reports, daemon=True)
    reader.start()
    run = subprocess.Popen([sys.executable, "-m", "cruijff", "run", "-q", "--workers", "1",
                            str(exp)],  # one trial after the other: a is done while b runs
                           env=prefect_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    calls, while_running, analyzed_partly = 0, 0, False
    try:
        last = False
        while not last:
            last = run.poll() is not None  # one more round after the run has ended
            summary, *analyses = at_once([("summary", "--json", exp),
                                          ("analyze", "--json", exp)], prefect_env)
            assert summary.returncode in (0, 1) and "Traceback" not in summary.stderr, \
                summary.stderr
            view = json.loads(summary.stdout)
            while_running += view["running"] and not last
            for trial in view["trials"]:
                for stage, status in trial["stages"].items():
                    if status["state"] in ("done", "reused", "outdated"):
                        assert read_record(trials[trial["id"]], stage).is_done, (trial, stage)
            for analysis in analyses:
                assert "Traceback" not in analysis.stderr, analysis.stderr
                if analysis.returncode == 2:
                    assert "has no results yet" in one_error_line(analysis.stderr)
                    continue
                assert analysis.returncode == 0, analysis.stderr
                result = json.loads(analysis.stdout)
                for trial in result["trials"]:
                    assert trial["status"] in ("ok", "pending", "running"), trial
                    if trial["status"] == "ok":
                        assert read_record(trials[trial["id"]], "eval").is_done, trial
                analyzed_partly |= any(t["status"] != "ok" for t in result["trials"])
            calls += 2
        out, err = run.communicate(timeout=30)
    finally:
        stop.set()
        if run.poll() is None:
            run.kill()
            run.wait()
    reader.join(timeout=5)
    assert run.returncode == 0, out + err
    assert torn == []
    assert while_running >= 1 and calls >= 4  # the loop really overlapped the run
    assert analyzed_partly, "no analyze ran while one trial was done and the other not"
    assert view["complete"] and summary.returncode == 0
    for analysis in analyses:
        assert analysis.returncode == 0, analysis.stderr
        assert [t["status"] for t in json.loads(analysis.stdout)["trials"]] == ["ok", "ok"]
    assert_report_whole(exp / "report")
