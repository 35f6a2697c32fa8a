"""The results store: loading an experiment from disk into SQL, idempotently, on SQLite and
PostgreSQL (synthetic experiments: real Inspect logs and stage records, nothing run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from postgres_support import fresh_database, query, require_postgres
from results_support import SyntheticTrial, make_experiment, record_usage
from sqlalchemy import func, select

from cruijff.errors import CruijffError
from cruijff.state import StageRecord, write_record
from cruijff.store import (
    DEFAULT_FILE,
    SCHEMA_VERSION,
    ExperimentRow,
    LossRow,
    MetricRow,
    SampleRow,
    StageRunRow,
    StoreInfo,
    TrialRow,
    load_experiment_results,
    normalize_url,
    open_store,
    rebuild_experiment_results,
)

TABLES = {"experiments": ExperimentRow, "trials": TrialRow, "stage_runs": StageRunRow,
          "metrics": MetricRow, "samples": SampleRow, "losses": LossRow}


def trials() -> list[SyntheticTrial]:
    return [
        SyntheticTrial("a", scores=[1, 0, 1, 1, 0], losses=[2.0, 1.5, 1.0]),
        SyntheticTrial("b", scores=[1, 1, 1, 1, 0], control="a", treatment={"eval.t": 1},
                       losses=[2.0, 1.0, 0.5, 0.25]),
        SyntheticTrial("c", control="a", treatment={"eval.t": 2}, eval_status="failed"),
        SyntheticTrial("d", control="a", treatment={"eval.t": 3}, eval_status=None),
        SyntheticTrial("e", control="a", treatment={"eval.t": 4}, eval_status="running"),
        SyntheticTrial("f", scores=[0.5, 1.0, 0.0, 0.25, 0.75], control="a",
                       treatment={"eval.t": 5}, epochs=2, finetune_reused_from="b"),
    ]


# stage_runs: a 2 (finetune, eval), b 2, c 1, d 0, e 1, f 2 (reused finetune, eval)
# metrics: finetune 3 each (a, b; a reused record copies none here), eval 2 each (a, b, f)
# samples: 5 (a) + 5 (b) + 5 x 2 epochs (f); losses: 3 (a) + 4 (b) + 4 (f reuses b's)
EXPECTED = {"experiments": 1, "trials": 6, "stage_runs": 8, "metrics": 12, "samples": 20,
            "losses": 11}


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    return make_experiment(tmp_path / "exp", trials())


def counts(store, experiment_pk: int | None = None) -> dict[str, int]:
    out = {}
    with store.session() as session:
        for name, table in TABLES.items():
            stmt = select(func.count()).select_from(table)
            if experiment_pk is not None:
                if table is ExperimentRow:
                    stmt = stmt.where(ExperimentRow.id == experiment_pk)
                elif table is TrialRow:
                    stmt = stmt.where(TrialRow.experiment_id == experiment_pk)
                else:
                    stmt = stmt.join(TrialRow, TrialRow.id == table.trial_pk).where(
                        TrialRow.experiment_id == experiment_pk)
            out[name] = session.scalar(stmt)
    return out


def test_load_fills_every_table(experiment: Path) -> None:
    with open_store(None, experiment) as store:
        report = load_experiment_results(store, experiment)
        assert counts(store) == EXPECTED
        assert report.loaded == ["a", "b", "f"]
        assert (report.samples, report.losses) == (20, 11)
        with store.session() as session:
            a = session.scalars(select(TrialRow).where(TrialRow.trial_id == "a")).one()
            assert (a.label, a.control, a.scorer, a.eval_status) == (
                "control", None, "exact_match", "done")
            f = session.scalars(select(TrialRow).where(TrialRow.trial_id == "f")).one()
            assert f.settings == {"eval.limit": 100, "eval.t": 5} and f.control == "a"
            scores = session.execute(
                select(SampleRow.sample_id, SampleRow.epoch, SampleRow.score, SampleRow.answer,
                       SampleRow.target).where(SampleRow.trial_pk == a.id)
                .order_by(SampleRow.sample_id)).all()
            # CORRECT/INCORRECT became 1/0; answers and targets kept
            assert [s.score for s in scores] == [1.0, 0.0, 1.0, 1.0, 0.0]
            assert scores[0].target == "S000" and scores[0].answer == "S000"
            assert scores[1].answer == "s001"
            runs = {(r.stage, r.status) for r in session.scalars(
                select(StageRunRow).where(StageRunRow.trial_pk == f.id))}
            assert runs == {("finetune", "reused"), ("eval", "done")}
            # a shared fine-tune's losses come from the trial that ran it
            f_losses = session.scalars(select(LossRow.loss).where(LossRow.trial_pk == f.id)
                                       .order_by(LossRow.step)).all()
            assert f_losses == [2.0, 1.0, 0.5, 0.25]
    assert (experiment / DEFAULT_FILE).is_file()


def test_missing_trials_are_reported_with_the_reason(experiment: Path) -> None:
    with open_store(None, experiment) as store:
        report = load_experiment_results(store, experiment)
    reasons = {m.id: m.reason for m in report.missing}
    assert reasons == {"c": "failed", "d": "pending", "e": "running"}
    failed = next(m for m in report.missing if m.id == "c")
    assert "no split 'nope'" in (failed.detail or "")
    assert "c (eval.t=2): failed" in failed.describe()


def test_loading_twice_gives_the_same_rows(experiment: Path) -> None:
    with open_store(None, experiment) as store:
        first = load_experiment_results(store, experiment)
        second = load_experiment_results(store, experiment)
        assert counts(store) == EXPECTED
        assert (second.loaded, second.samples) == (first.loaded, first.samples)


def test_rebuild_follows_the_disk(experiment: Path) -> None:
    with open_store(None, experiment) as store:
        load_experiment_results(store, experiment)
        # trial b's eval is re-run and fails: its samples must leave the store
        write_record(experiment / "trial-b", StageRecord("eval", "k", "failed", error="boom"))
        report = rebuild_experiment_results(store, experiment)
        assert "b" not in report.loaded
        assert counts(store)["samples"] == EXPECTED["samples"] - 5
        assert counts(store)["experiments"] == 1


def test_rebuild_from_scratch_when_the_file_is_gone(experiment: Path) -> None:
    with open_store(None, experiment) as store:
        load_experiment_results(store, experiment)
    (experiment / DEFAULT_FILE).unlink()
    with open_store(None, experiment) as store:
        load_experiment_results(store, experiment)
        assert counts(store) == EXPECTED


def test_experiments_share_a_database_without_touching_each_other(tmp_path: Path) -> None:
    one = make_experiment(tmp_path / "one", trials())
    two = make_experiment(tmp_path / "two", trials()[:2])
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    with open_store(url) as store:
        first = load_experiment_results(store, one)
        second = load_experiment_results(store, two)
        load_experiment_results(store, one)  # replaces only experiment one's rows
        assert counts(store)["experiments"] == 2
        assert counts(store, second.experiment_pk)["samples"] == 10
        mine = load_experiment_results(store, one)
        assert counts(store, mine.experiment_pk) == EXPECTED
        assert first.experiment_pk != second.experiment_pk


def test_unreadable_log_is_missing_not_fatal(experiment: Path) -> None:
    log = next((experiment / "trial-b" / "logs" / "eval").glob("*.eval"))
    log.write_bytes(b"not a zip file")
    shutil.rmtree(experiment / "trial-f" / "logs" / "eval")
    with open_store(None, experiment) as store:
        report = load_experiment_results(store, experiment)
    reasons = {m.id: m.reason for m in report.missing}
    assert reasons["b"] == "unreadable" and reasons["f"] == "unreadable"
    assert report.loaded == ["a"]


def test_database_url_setting(experiment: Path, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "elsewhere.sqlite"
    monkeypatch.setenv("CRUIJFF_DATABASE_URL", f"sqlite:///{target}")
    with open_store(None, experiment) as store:
        load_experiment_results(store, experiment)
    assert target.is_file() and not (experiment / DEFAULT_FILE).exists()


def test_bad_urls_are_one_line_errors(experiment: Path) -> None:
    with pytest.raises(CruijffError, match="cannot use results database"):
        open_store("nosuchdb://x/y", experiment)
    with pytest.raises(CruijffError, match=r"cannot open results database .*\*\*\*"):
        open_store("postgresql://someone:secret@127.0.0.1:1/none", experiment)
    with pytest.raises(CruijffError, match="not a cruijff experiment"), \
            open_store(None, experiment) as store:
        load_experiment_results(store, experiment / "trial-a" / "logs")


def test_another_schema_version_is_rebuilt(experiment: Path) -> None:
    with open_store(None, experiment) as store:
        load_experiment_results(store, experiment)
        with store.session() as session:
            session.get(StoreInfo, "schema_version").value = "0"
    with open_store(None, experiment) as store:
        assert counts(store)["samples"] == 0  # derived data: dropped, to be loaded again
        load_experiment_results(store, experiment)
        assert counts(store) == EXPECTED


COMPUTE_COLUMNS = ("wall_s", "cpu_s", "peak_rss_mib", "gpu_peak_mib", "requested_mem_mib",
                   "requested_time_s", "outcome", "sacct_state", "sacct_max_rss_mib",
                   "throughput", "size", "usage_final")


def measure(experiment: Path) -> None:
    """Chosen figures on a's fine-tune (a Slurm attempt) and b's eval (local, a GPU)."""
    record_usage(experiment / "trial-a", "finetune", outcome="OUT_OF_MEMORY",
                 usage={"wall_s": 31.5, "cpu_s": 60.25, "peak_rss_mib": 2100.0, "final": False,
                        "throughput": {"tokens_per_s": 812.5, "training_tokens": 25600},
                        "size": {"epochs": 1, "train_examples": 800}},
                 slurm={"job_id": "41", "step_id": "3", "state": "OUT_OF_MEMORY",
                        "max_rss_mib": 2150.0, "requested": {"mem_mib": 2048, "time_s": 1800},
                        "source": "sacct"})
    record_usage(experiment / "trial-b", "eval", usage={
        "wall_s": 12.0, "peak_rss_mib": 900.0,
        "gpus": [{"device": "GPU-x", "peak_used_mib": 5000, "total_mib": 81920}],
        "throughput": {"samples_per_s": 0.4}})


def compute_columns(store) -> dict[tuple[str, str], tuple]:
    with store.session() as session:
        rows = session.execute(select(TrialRow.trial_id, StageRunRow).select_from(StageRunRow)
                               .join(TrialRow, TrialRow.id == StageRunRow.trial_pk)).all()
        return {(t, r.stage): tuple(getattr(r, c) for c in COMPUTE_COLUMNS) for t, r in rows}


def check_compute_columns(store) -> None:
    columns = compute_columns(store)
    assert columns["a", "finetune"] == (
        31.5, 60.25, 2100.0, None, 2048.0, 1800.0, "OUT_OF_MEMORY", "OUT_OF_MEMORY", 2150.0,
        {"tokens_per_s": 812.5, "training_tokens": 25600}, {"epochs": 1, "train_examples": 800},
        False)
    assert columns["b", "eval"] == (12.0, None, 900.0, 5000.0, None, None, None, None, None,
                                    {"samples_per_s": 0.4}, {}, True)
    # not measured: cruijff's own clock is the wall time; a reused stage ran elsewhere
    assert columns["a", "eval"] == (2.0, None, None, None, None, None, None, None, None,
                                    {}, {}, None)
    assert columns["f", "finetune"] == (None,) * 9 + ({}, {}, None)


def test_stage_runs_carry_what_each_attempt_used(experiment: Path) -> None:
    measure(experiment)
    with open_store(None, experiment) as store:
        load_experiment_results(store, experiment)
        check_compute_columns(store)


def test_a_store_of_the_previous_schema_is_rebuilt_with_the_compute_columns(
        experiment: Path) -> None:
    import sqlite3

    with sqlite3.connect(experiment / DEFAULT_FILE) as db:  # what schema 2 left
        db.execute("CREATE TABLE cruijff_store (key VARCHAR(64) PRIMARY KEY, "
                   "value VARCHAR(200))")
        db.execute("INSERT INTO cruijff_store VALUES ('schema_version', '2')")
        db.execute("CREATE TABLE stage_runs (id INTEGER PRIMARY KEY, trial_pk INTEGER, "
                   "stage VARCHAR(64))")
    measure(experiment)
    with open_store(None, experiment) as store:
        load_experiment_results(store, experiment)
        check_compute_columns(store)
        with store.session() as session:
            assert session.get(StoreInfo, "schema_version").value == str(SCHEMA_VERSION)


def test_postgres_urls_use_psycopg() -> None:
    assert normalize_url("postgresql+asyncpg://u:p@h:5432/d") == "postgresql+psycopg://u:p@h:5432/d"
    assert normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("sqlite:///x.sqlite") == "sqlite:///x.sqlite"


def test_postgresql_store(experiment: Path) -> None:
    require_postgres()
    measure(experiment)
    with fresh_database("cruijff_store") as db:
        with open_store(db.url, experiment) as store:  # the asyncpg form Prefect uses
            assert store.url.startswith("postgresql+psycopg://") and db.password not in store.url
            load_experiment_results(store, experiment)
            load_experiment_results(store, experiment)
            assert counts(store) == EXPECTED
            check_compute_columns(store)
            report = rebuild_experiment_results(store, experiment)
            assert report.loaded == ["a", "b", "f"]
        assert query(db.url, "SELECT count(*) FROM samples") == [(20,)]
        assert query(db.url, "SELECT count(*) FROM trials WHERE eval_status = 'failed'") == [(1,)]
        assert not (experiment / DEFAULT_FILE).exists()


def test_experiment_config_with_aliases_is_refused(experiment: Path) -> None:
    config = experiment / "config.yaml"
    config.write_text(config.read_text() + "extra: &x [1, 2]\nmore: *x\n")
    with open_store(None, experiment) as store, \
            pytest.raises(CruijffError, match="aliases"):
        load_experiment_results(store, experiment)
