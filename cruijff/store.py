"""The results store: an experiment's results from disk in SQL tables, for `cruijff analyze`.

Disk is the truth (stage records, Inspect logs, torchtune loss logs); the store is derived from
it and can always be rebuilt. Loading an experiment replaces, in one transaction, the rows of
the trials whose records, logs or settings changed since they were loaded (each trial row keeps
a digest of what it was read from), so loading twice gives the same rows, a second load of an
unchanged experiment reads no log, and a failed load leaves the previous rows.

By default the store is a SQLite file in the experiment folder (`results.sqlite`); any
SQLAlchemy URL works instead (`CRUIJFF_DATABASE_URL`, e.g. a team's PostgreSQL). Experiments
are keyed by (folder path, name), so one database can hold many.

Concurrency: two `analyze` at once (or one writing while another reads) never see half a load
and never fail with "database is locked": SQLite transactions start with BEGIN IMMEDIATE (one
writer at a time, waiting up to 30 s, and reads see one committed state); on PostgreSQL an
advisory lock serializes loads of one experiment and reads use REPEATABLE READ.

Tables: experiments, trials (one per trial of the experiment, with its resolved settings),
stage_runs (one per stage record), metrics (numbers from the records), samples (one per scored
Inspect sample, epoch and scorer), losses (fine-tune loss per step).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from cruijff import __version__
from cruijff.errors import CruijffError
from cruijff.experiment import experiment_config, trial_dir_name
from cruijff.fileio import load_yaml_mapping
from cruijff.log_scores import LogScores, as_number, as_text, read_logs
from cruijff.registry import DEFAULT_PIPELINE, STAGES
from cruijff.state import StageRecord, read_record, record_path
from cruijff.urls import mask_url
from cruijff.utilization import AttemptUse, attempt_use

SCHEMA_VERSION = "5"
DEFAULT_FILE = "results.sqlite"

__all__ = [
    "DEFAULT_FILE",
    "LoadReport",
    "MissingTrial",
    "Store",
    "delete_experiment",
    "load_experiment_results",
    "open_store",
    "rebuild_experiment_results",
]


# ---------------------------------------------------------------------------------------------
# Tables


class Base(DeclarativeBase):
    pass


class StoreInfo(Base):
    """Key/value facts about the store itself (its schema version)."""

    __tablename__ = "cruijff_store"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))


class ExperimentRow(Base):
    __tablename__ = "experiments"
    __table_args__ = (UniqueConstraint("path", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(1024))
    name: Mapped[str] = mapped_column(String(200))
    task: Mapped[str | None] = mapped_column(String(200))
    created: Mapped[str | None] = mapped_column(String(64))
    loaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TrialRow(Base):
    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("experiment_id", "trial_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    trial_id: Mapped[str] = mapped_column(String(32))
    position: Mapped[int] = mapped_column(Integer)
    """Order in the experiment (a, b, ..., z, aa, ...)."""
    label: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(300))
    dataset: Mapped[str] = mapped_column(String(300))
    control: Mapped[str | None] = mapped_column(String(32))
    """Id of this trial's control trial (None for a control trial)."""
    use_fine_tune: Mapped[bool] = mapped_column(Boolean)
    use_prompt_opt: Mapped[bool] = mapped_column(Boolean, default=False)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    treatment: Mapped[dict[str, Any]] = mapped_column(JSON)
    eval_status: Mapped[str] = mapped_column(String(32))
    """'done' when its samples are loaded, else why not: pending, running, failed, unreadable."""
    eval_detail: Mapped[str | None] = mapped_column(Text)
    eval_log: Mapped[str | None] = mapped_column(Text)
    """The Inspect log the samples came from, relative to the trial folder."""
    scorer: Mapped[str | None] = mapped_column(String(200))
    """The scorer of the trial's headline metric, as its sample rows name it: the samples
    analyze reads."""
    metric: Mapped[str | None] = mapped_column(String(300))
    """The headline metric, `<scorer>/<metric>` (eval.metric, else the first scorer's first)."""
    metric_default: Mapped[bool | None] = mapped_column(Boolean)
    """True: not chosen by eval.metric (the first scorer's first metric)."""
    source: Mapped[str | None] = mapped_column(String(64))
    """A digest of what the trial's rows were read from (_source): while disk gives the same,
    a load keeps them instead of reading its logs again."""


class StageRunRow(Base):
    __tablename__ = "stage_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_pk: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer)
    duration_s: Mapped[float | None] = mapped_column(Float)
    where: Mapped[str | None] = mapped_column(String(300))
    key: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[str] = mapped_column(String(64))
    started: Mapped[str | None] = mapped_column(String(64))
    finished: Mapped[str | None] = mapped_column(String(64))
    reused_from: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    # What the attempt used and asked for (cruijff.utilization; None where not known). Both
    # memory views are kept: the launcher's (peak_rss_mib) and Slurm's (sacct_max_rss_mib).
    wall_s: Mapped[float | None] = mapped_column(Float)
    cpu_s: Mapped[float | None] = mapped_column(Float)
    peak_rss_mib: Mapped[float | None] = mapped_column(Float)
    gpu_peak_mib: Mapped[float | None] = mapped_column(Float)
    requested_mem_mib: Mapped[float | None] = mapped_column(Float)
    requested_time_s: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str | None] = mapped_column(String(32))
    sacct_state: Mapped[str | None] = mapped_column(String(32))
    sacct_max_rss_mib: Mapped[float | None] = mapped_column(Float)
    throughput: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    size: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    usage_final: Mapped[bool | None] = mapped_column(Boolean)
    """False: the figures are the last snapshot of an attempt killed before its totals."""


class MetricRow(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_pk: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[float | None] = mapped_column(Float)


class SampleRow(Base):
    __tablename__ = "samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_pk: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"), index=True)
    scorer: Mapped[str] = mapped_column(String(200))
    sample_id: Mapped[str] = mapped_column(String(300))
    epoch: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    answer: Mapped[str | None] = mapped_column(Text)
    target: Mapped[str | None] = mapped_column(Text)


class LossRow(Base):
    __tablename__ = "losses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_pk: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    """None where the logged loss was not finite (nan/inf)."""


CHILD_TABLES = (StageRunRow, MetricRow, SampleRow, LossRow)


# ---------------------------------------------------------------------------------------------
# Opening


def normalize_url(url: str) -> str:
    """PostgreSQL URLs go through psycopg 3 (sync): `postgresql://`, `postgres://` and the
    asyncpg form Prefect uses (`postgresql+asyncpg://`) all mean the same database."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        return f"postgresql+psycopg://{rest}"
    return url


@dataclass
class Store:
    """An open results store. Use as a context manager, or call close()."""

    engine: Engine
    url: str
    """Masked (no password): safe to print."""

    @contextmanager
    def session(self, *, snapshot: bool = False) -> Iterator[Session]:
        """A session whose work is committed at the end of the block (rolled back on error).
        `snapshot`: all its reads see one committed state (SQLite's always do, see
        _sqlite_begin; PostgreSQL's need REPEATABLE READ), e.g. not half of another load."""
        engine = self.engine
        if snapshot and engine.dialect.name == "postgresql":
            engine = engine.execution_options(isolation_level="REPEATABLE READ")
        with Session(engine) as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_url(experiment_path: Path) -> str:
    return f"sqlite:///{Path(experiment_path).resolve() / DEFAULT_FILE}"


def open_store(url: str | None, experiment_path: Path | None = None) -> Store:
    """Open (and create or upgrade) the store at `url`; None means the setting
    `database_url` (CRUIJFF_DATABASE_URL), else `<experiment_path>/results.sqlite`."""
    if url is None:
        from cruijff.settings import CruijffSettings

        url = CruijffSettings().database_url
    if url is None:
        if experiment_path is None:
            raise CruijffError("no results database: give a database URL or an experiment")
        url = default_url(experiment_path)
    url = normalize_url(url)
    shown = mask_url(url)
    try:
        engine = create_engine(url)
    except ImportError as exc:
        raise CruijffError(f"cannot use results database {shown}: {exc} (for PostgreSQL: "
                           "pip install 'cruijff[postgres]')") from None
    except ArgumentError as exc:
        raise CruijffError(f"cannot use results database {shown}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    try:
        _prepare_schema(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise CruijffError(f"cannot open results database {shown}: {reason}") from None
    return Store(engine, shown)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Left to itself, Python's sqlite3 starts a transaction only at the first write: reads
    # before it see other processes' commits, and a transaction that read first can fail at
    # once with "database is locked" (SQLite refuses to wait where two could deadlock).
    # _sqlite_begin starts every transaction instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    """Every SQLite transaction takes the write lock first (waiting for it: busy_timeout): one
    at a time, so none can deadlock another, and its reads see one committed state."""
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _serialize(connection: Connection | Session, name: str) -> None:
    """On PostgreSQL, hold a lock named `name` until the transaction ends: transactions that
    would race each other (two creating the tables, two loading one experiment) take turns.
    SQLite needs none: its transactions already take turns."""
    bind = connection if isinstance(connection, Connection) else connection.get_bind()
    if bind.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"cruijff:{name}".encode()).digest()[:8], "big",
                             signed=True)
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _prepare_schema(engine: Engine) -> None:
    """Create the tables; tables of another schema version are dropped and made again
    (the store is derived data: `analyze` loads what it needs from disk). One transaction,
    so two processes opening a new store at once do not both create it."""
    version_of = select(StoreInfo.value).where(StoreInfo.key == "schema_version")
    with engine.begin() as connection:
        _serialize(connection, "schema")
        if (StoreInfo.__tablename__ in inspect(connection).get_table_names()
                and connection.scalar(version_of) != SCHEMA_VERSION):
            Base.metadata.drop_all(connection)
        Base.metadata.create_all(connection)
        if connection.scalar(version_of) is None:
            connection.execute(insert(StoreInfo).values(key="schema_version",
                                                        value=SCHEMA_VERSION))


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class MissingTrial:
    """A trial without results: its eval is pending, running, failed, or its log unreadable."""

    id: str
    label: str
    reason: str
    detail: str | None = None

    def describe(self) -> str:
        return f"{self.id} ({self.label}): {self.reason}" + (
            f": {self.detail}" if self.detail else "")


@dataclass
class LoadReport:
    experiment: str
    path: Path
    experiment_pk: int
    trials: int
    loaded: list[str] = field(default_factory=list)
    """Ids of the trials whose samples were loaded."""
    missing: list[MissingTrial] = field(default_factory=list)
    samples: int = 0
    losses: int = 0
    duration_s: float = 0.0


def delete_experiment(session: Session, path: Path, name: str) -> bool:
    """Remove one experiment's rows; True if it was there."""
    pk = session.scalar(select(ExperimentRow.id).where(
        ExperimentRow.path == str(path), ExperimentRow.name == name))
    if pk is None:
        return False
    trial_pks = select(TrialRow.id).where(TrialRow.experiment_id == pk).scalar_subquery()
    for table in CHILD_TABLES:
        session.execute(delete(table).where(table.trial_pk.in_(trial_pks)))
    session.execute(delete(TrialRow).where(TrialRow.experiment_id == pk))
    session.execute(delete(ExperimentRow).where(ExperimentRow.id == pk))
    return True


def load_experiment_results(store: Store, experiment: Path) -> LoadReport:
    """Load an experiment's results from disk into the store. Only trials whose records, logs
    or entry changed since the store was filled (TrialRow.source) are read and written again;
    the others' rows stay. Trials no longer in the experiment are removed."""
    started = time.perf_counter()
    path = Path(experiment).expanduser().resolve()
    config = experiment_config(path)
    name = str(config["name"])
    trials = list(config["trials"])
    sources = {str(entry["id"]): _source(path, entry) for entry in trials}
    try:
        with store.session(snapshot=True) as session:
            stored = _stored_sources(session, path, name)
        # Read from disk first, outside the transaction: it then mostly writes.
        gathered = _gather(path, [e for e in trials if stored.get(str(e["id"]))
                                  != sources[str(e["id"])]])
        report = LoadReport(name, path, 0, len(trials))
        with store.session() as session:
            _serialize(session, f"load:{path}")
            _write(session, path, config, trials, sources, gathered, report)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise CruijffError(f"cannot write results to {store.url}: {reason}") from None
    report.duration_s = time.perf_counter() - started
    return report


def _stored_sources(session: Session, path: Path, name: str) -> dict[str, str | None]:
    """Trial id -> the source its rows in the store were read from."""
    return {trial_id: source for trial_id, source in session.execute(
        select(TrialRow.trial_id, TrialRow.source).join(
            ExperimentRow, TrialRow.experiment_id == ExperimentRow.id).where(
            ExperimentRow.path == str(path), ExperimentRow.name == name))}


def _gather(path: Path, entries: list[dict[str, Any]]) -> dict[str, _Gathered]:
    gathered = {str(entry["id"]): _gather_trial(path, entry) for entry in entries}
    with_logs = [g for g in gathered.values() if g.log is not None]
    for trial, scores in zip(with_logs, read_logs([g.log for g in with_logs]), strict=True):
        _apply_scores(trial, scores)
    return gathered


def _write(session: Session, path: Path, config: dict[str, Any], trials: list[dict[str, Any]],
           sources: dict[str, str], gathered: dict[str, _Gathered], report: LoadReport) -> None:
    """In the load's transaction: the experiment row, then each trial's rows replaced where
    its source changed (also one another load wrote meanwhile, read now), kept elsewhere."""
    name = str(config["name"])
    exp = session.scalar(select(ExperimentRow).where(ExperimentRow.path == str(path),
                                                     ExperimentRow.name == name))
    if exp is None:
        exp = ExperimentRow(path=str(path), name=name)
        session.add(exp)
    exp.task, exp.created = config.get("task"), as_text(config.get("created"))
    exp.loaded_at = datetime.now(UTC)
    session.flush()
    report.experiment_pk = exp.id
    kept = {row.trial_id: row for row in session.scalars(
        select(TrialRow).where(TrialRow.experiment_id == exp.id))}
    late = [e for e in trials if str(e["id"]) not in gathered
            and (str(e["id"]) not in kept or kept[str(e["id"])].source != sources[str(e["id"])])]
    gathered = {**gathered, **_gather(path, late)}
    stale = [row.id for trial_id, row in kept.items()
             if trial_id in gathered or trial_id not in sources]
    for table in CHILD_TABLES:
        session.execute(delete(table).where(table.trial_pk.in_(stale)))
    session.execute(delete(TrialRow).where(TrialRow.id.in_(stale)))
    rows: dict[type[Base], list[dict[str, Any]]] = {t: [] for t in CHILD_TABLES}
    for position, entry in enumerate(trials):
        trial_id = str(entry["id"])
        trial = gathered.get(trial_id)
        if trial is None:  # unchanged: its rows stay, at its place in the experiment now
            row = kept[trial_id]
            row.position = position
            if row.eval_status == "done":
                report.loaded.append(trial_id)
            else:
                report.missing.append(MissingTrial(trial_id, row.label, row.eval_status,
                                                   row.eval_detail))
            continue
        row = TrialRow(experiment_id=exp.id, position=position, source=sources[trial_id],
                       **trial.columns)
        session.add(row)
        session.flush()
        for table, children in trial.children.items():
            rows[table].extend({"trial_pk": row.id, **child} for child in children)
        if trial.missing is None:
            report.loaded.append(trial_id)
        else:
            report.missing.append(trial.missing)
    for table, children in rows.items():
        if children:
            session.execute(insert(table), children)
    session.flush()
    trial_pks = select(TrialRow.id).where(TrialRow.experiment_id == exp.id).scalar_subquery()
    report.samples, report.losses = (
        session.scalar(select(func.count()).select_from(table).where(
            table.trial_pk.in_(trial_pks))) or 0 for table in (SampleRow, LossRow))


def _source(path: Path, entry: dict[str, Any]) -> str:
    """What a trial's rows are read from, as a digest: its entry in the experiment config,
    and the inode, size and mtime of its stage records, of the first output each names (the
    eval's log), and of the record and stage config its losses come from (another trial's,
    for a stage reused from it); with the store's schema and cruijff's version. A stage that
    runs again writes its record again, so a changed log changes the source. (Editing a done
    stage's log by hand does not: `rebuild_experiment_results` reads everything again.)"""
    trial_dir = path / trial_dir_name(str(entry["id"]))
    files: list[Path] = []
    for stage in list(entry.get("stages") or DEFAULT_PIPELINE):
        files.append(record_path(trial_dir, stage))
        record = read_record(trial_dir, stage)
        if record is None:
            continue
        owner = path / trial_dir_name(record.reused_from) if record.reused_from else trial_dir
        if record.reused_from:
            files.append(record_path(owner, stage))
        if stage in STAGES:
            files.append(STAGES[stage].config_path(owner))
        files += [trial_dir / output for output in record.outputs[:1]]
    stats = []
    for file in files:
        try:
            stat = file.stat()
            stats.append((str(file), stat.st_ino, stat.st_size, stat.st_mtime_ns))
        except OSError:
            stats.append((str(file), None))
    return hashlib.sha256(json.dumps([SCHEMA_VERSION, __version__, entry, stats],
                                     sort_keys=True, default=str).encode()).hexdigest()


def rebuild_experiment_results(store: Store, experiment: Path) -> LoadReport:
    """Drop the experiment's rows, then load it again from disk.

    (Loading already replaces them; this is the explicit form, in two transactions.)"""
    path = Path(experiment).expanduser().resolve()
    name = str(experiment_config(path)["name"])
    with store.session() as session:
        delete_experiment(session, path, name)
    return load_experiment_results(store, path)


@dataclass
class _Gathered:
    columns: dict[str, Any]
    children: dict[type[Base], list[dict[str, Any]]]
    missing: MissingTrial | None
    log: Path | None = None
    """The eval log to read its samples from."""
    headline: tuple[str, bool] | None = None
    """The headline metric the eval recorded and whether it is the default."""

    def set_missing(self, reason: str, detail: str | None) -> None:
        self.columns["eval_status"], self.columns["eval_detail"] = reason, detail
        self.missing = MissingTrial(self.columns["trial_id"], self.columns["label"], reason,
                                    detail)


def _gather_trial(path: Path, entry: dict[str, Any]) -> _Gathered:
    """A trial's rows from its records and loss log; its eval log is read later, with all
    the others (see log_scores.read_logs)."""
    trial_id = str(entry["id"])
    trial_dir = path / trial_dir_name(trial_id)
    label = str(entry.get("label") or ("control" if not entry.get("treatment") else trial_id))
    stages = list(entry.get("stages") or DEFAULT_PIPELINE)
    records = {stage: read_record(trial_dir, stage) for stage in stages}
    children: dict[type[Base], list[dict[str, Any]]] = {t: [] for t in CHILD_TABLES}
    for stage, record in records.items():
        if record is None:
            continue
        children[StageRunRow].append({
            "stage": stage, "status": record.status, "attempts": record.attempts,
            "duration_s": as_number(record.duration_s), "where": record.where, "key": record.key,
            "run_id": record.run_id, "started": record.started, "finished": record.finished,
            "reused_from": record.reused_from, "error": record.error, **_use_columns(record),
        })
        for metric, value in record.metrics.items():
            if isinstance(value, str):  # the headline's name: the trial's `metric` column
                continue
            children[MetricRow].append({"stage": stage, "name": str(metric),
                                        "value": as_number(value)})
        if not children[LossRow]:
            children[LossRow] = [{"step": step, "loss": as_number(loss)} for step, loss in
                                 enumerate(_losses(path, trial_dir, stage, record), 1)]

    columns: dict[str, Any] = {
        "trial_id": trial_id, "label": label, "model": str(entry.get("model", "")),
        "dataset": str(entry.get("dataset", "")), "control": as_text(entry.get("control")),
        "use_fine_tune": bool(entry.get("use_fine_tune", "finetune" in stages)),
        "use_prompt_opt": bool(entry.get("use_prompt_opt", "prompt_opt" in stages)),
        "settings": dict(entry.get("settings") or {}),
        "treatment": dict(entry.get("treatment") or {}),
        "eval_status": "pending", "eval_detail": None, "eval_log": None, "scorer": None,
        "metric": None, "metric_default": None,
    }
    gathered = _Gathered(columns, children, None)
    scoring = scoring_stage(stages)
    record = records.get(scoring) if scoring else None
    chosen = record.metrics.get("headline") if record is not None else None
    if isinstance(chosen, str):  # recorded by the eval (older records: the default)
        gathered.headline = (chosen, record.metrics.get("headline_default") is not False)
    if record is None:
        gathered.set_missing("pending", f"no {scoring or 'eval'} record yet")
    elif record.status == "running":
        gathered.set_missing("running", f"since {record.started}" if record.started else None)
    elif record.status == "failed":
        error = (record.error or "").strip().splitlines()
        gathered.set_missing("failed", error[-1] if error else None)
    elif not record.outputs:
        gathered.set_missing("unreadable", f"the {scoring} record names no log")
    else:
        columns["eval_log"] = record.outputs[0]
        gathered.log = trial_dir / record.outputs[0]
    return gathered


def _use_columns(record: StageRecord) -> dict[str, Any]:
    """A stage run's compute columns (all None for a stage reused from another trial)."""
    use = attempt_use(record) or AttemptUse()
    return {"wall_s": use.wall_s, "cpu_s": use.cpu_s,
            "peak_rss_mib": as_number(record.usage.peak_rss_mib)
            if record.usage and not record.reused_from else None,
            "gpu_peak_mib": use.gpu_peak_mib, "requested_mem_mib": use.asked_mem_mib,
            "requested_time_s": use.asked_time_s, "outcome": use.outcome,
            "sacct_state": use.sacct_state, "sacct_max_rss_mib": use.sacct_max_rss_mib,
            "throughput": use.throughput, "size": use.size, "usage_final": use.final}


def scoring_stage(stages: list[str]) -> str | None:
    """Of a trial's stages, the last whose run is scored per sample (its eval)."""
    return next((s for s in reversed(stages) if s in STAGES and STAGES[s].scores), None)


def _losses(path: Path, trial_dir: Path, name: str, record: StageRecord) -> list[float]:
    """The training losses of a done stage that trains, read from the trial that ran it."""
    if name not in STAGES or not record.is_done:
        return []
    stage = STAGES[name]
    owner = path / trial_dir_name(record.reused_from) if record.reused_from else trial_dir
    try:
        config = load_yaml_mapping(stage.config_path(owner), f"{stage.name} config")
    except CruijffError:  # no config to read the log's place from: the stage's default place
        config = {}
    return stage.losses(owner, config)


def _apply_scores(gathered: _Gathered, scores: LogScores | BaseException) -> None:
    """The trial's sample rows (every scorer's), and which scorer's its headline reads."""
    log = gathered.log
    if isinstance(scores, BaseException):  # a truncated zip, a log of a newer Inspect, ...
        gathered.set_missing("unreadable", f"{log}: {type(scores).__name__}: {scores}")
        return
    if not scores.rows:
        gathered.set_missing("unreadable", f"{log} has no scored samples")
        return
    metric, default = gathered.headline or (scores.default, True)
    present = list(dict.fromkeys(row["scorer"] for row in scores.rows))
    if metric is None:  # the log names no metric: its first scorer's samples
        metric = present[0]
    name = metric.rpartition("/")[0] or metric
    scorer = scores.scorers.get(name, name)
    if scorer not in present and default:  # the first scorer scored no sample: as before,
        scorer = metric = present[0]  # the first that did
    if scorer not in present:
        gathered.set_missing("unreadable", f"{log} has no per-sample scores of scorer "
                             f"{name!r} (headline {metric}); it has {', '.join(present)}")
        return
    gathered.columns.update(eval_status="done", scorer=scorer, metric=metric,
                            metric_default=default)
    gathered.children[SampleRow] = scores.rows
