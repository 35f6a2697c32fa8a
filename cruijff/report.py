"""`cruijff analyze`: load an experiment's results into the store, compute from there, report.

Everything is computed from the store (cruijff/store.py), which is loaded from disk first:
per trial the metric (mean per-sample score; accuracy for CORRECT/INCORRECT scorers) with its
confidence interval, the final fine-tune loss and the wall time; per treatment a paired
comparison with its control on the samples both scored, with Holm-adjusted p-values across all
treatments (statistics in cruijff/analysis.py). Trials without results are named, not fatal.

The report folder (default `<experiment>/report/`) holds results.csv, report.md and a
self-contained report.html (inline CSS and SVG plots, no scripts, no external references).
Each file is written to a temporary file and renamed into place: a reader, or another analyze
at the same time, sees a whole file, old or new, never half of one.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from cruijff.analysis import (
    RESAMPLES,
    Comparison,
    Estimate,
    compare,
    holm,
    is_binary,
    mean_estimate,
)
from cruijff.containment import check_contained
from cruijff.errors import CruijffError
from cruijff.experiment import REPORT_DIR, experiment_config, trial_dir_name
from cruijff.fileio import atomic_write_text, json_safe
from cruijff.registry import DEFAULT_PIPELINE, STAGES
from cruijff.stages.eval import describe_headline
from cruijff.state import read_record
from cruijff.store import (
    ExperimentRow,
    LoadReport,
    LossRow,
    MetricRow,
    MissingTrial,
    SampleRow,
    StageRunRow,
    Store,
    TrialRow,
    load_experiment_results,
    open_store,
    scoring_stage,
)
from cruijff.summary import in_run_order
from cruijff.utilization import (
    HIGH_SHARE,
    LOW_SHARE,
    AttemptUse,
    duration_text,
    memory_text,
    share_text,
    throughput_text,
    with_shares,
)

FORMATS = frozenset({"md", "html", "csv"})
ALPHA = 0.05
CSV_COLUMNS = ("id", "label", "model", "dataset", "metric", "ci_low", "ci_high", "n",
               "diff_vs_control", "diff_low", "diff_high", "p", "p_holm", "method",
               "final_loss", "wall_s", "control", "n_pairs", "ci_method", "status",
               "headline", "headline_default", "scorer_metrics")
"""The last three (added later, so older readers' columns keep their places): the trial's
headline `<scorer>/<metric>`, whether it is the default, and every scorer's metrics (JSON)."""

__all__ = [
    "CSV_COLUMNS",
    "FORMATS",
    "Analysis",
    "StageCompute",
    "TrialResult",
    "analysis_table",
    "analyze",
    "compute_analysis",
    "write_report",
]


@dataclass
class TrialResult:
    id: str
    label: str
    model: str
    dataset: str
    control: str | None
    status: str
    """'ok' when the trial has results; else its eval's state in runner.trial_states' words
    (pending, blocked, running, interrupted, failed, ...), or unreadable (its log)."""
    detail: str | None = None
    scorer: str | None = None
    estimate: Estimate | None = None
    comparison: Comparison | None = None
    p_holm: float | None = None
    note: str | None = None
    """Why a treatment has no comparison (its control has no results, no common samples)."""
    final_loss: float | None = None
    losses: list[float | None] = field(default_factory=list)
    losses_from: str | None = None
    """The trial whose fine-tune this one reused (its losses are that trial's run's)."""
    wall_s: float | None = None
    arm: str = "fine-tune"
    """How the trial adapts the model: base, prompt-opt, fine-tune or both."""
    headline: str | None = None
    """Its headline metric `<scorer>/<metric>`: its estimate is the mean of that scorer's
    per-sample scores."""
    headline_default: bool | None = None
    """True: not chosen by eval.metric (the first scorer's first metric)."""
    metrics: dict[str, float | None] = field(default_factory=dict)
    """Every metric of every scorer, as Inspect computed them (the eval record's)."""

    @property
    def has_results(self) -> bool:
        return self.estimate is not None

    def to_dict(self) -> dict[str, Any]:
        est, cmp = self.estimate, self.comparison
        return json_safe({
            "id": self.id, "label": self.label, "model": self.model, "dataset": self.dataset,
            "control": self.control, "status": self.status, "detail": self.detail,
            "scorer": self.scorer,
            "headline": None if self.headline is None else {
                "metric": self.headline, "default": self.headline_default,
                "text": describe_headline(self.headline, self.headline_default)},
            "metric": None if est is None else {
                "value": est.value, "low": est.low, "high": est.high, "n": est.n,
                "method": est.method},
            "scorer_metrics": self.metrics,
            "vs_control": None if cmp is None else {
                "n": cmp.n, "difference": cmp.difference, "low": cmp.low, "high": cmp.high,
                "p": cmp.p_value, "p_holm": self.p_holm, "method": cmp.method,
                "wins": cmp.wins, "losses": cmp.losses},
            "note": self.note, "arm": self.arm, "final_loss": self.final_loss,
            "steps": len(self.losses), "losses_from": self.losses_from,
            "wall_s": self.wall_s,
        })


@dataclass
class StageCompute:
    """What one stage run of a trial used beside what its job asked for (from the store)."""

    trial: str
    label: str
    stage: str
    status: str
    reused_from: str | None
    use: AttemptUse

    def to_dict(self) -> dict[str, Any]:
        figures = {k: v for k, v in asdict(self.use).items() if k not in ("attempt", "status")}
        return json_safe({"trial": self.trial, "stage": self.stage, "status": self.status,
                          "attempts": self.use.attempt, "reused_from": self.reused_from,
                          **figures})


@dataclass
class Analysis:
    experiment: str
    path: Path
    metric: str
    """'accuracy' when every score is 0/1, else 'mean score'."""
    confidence: float
    trials: list[TrialResult]
    store_url: str
    load: LoadReport | None = None
    report_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    compute: list[StageCompute] = field(default_factory=list)
    """Every stage run of every trial, in trial and pipeline order."""
    seed: int = 0

    @property
    def headlines(self) -> list[tuple[str, bool | None]]:
        """The trials' headline metrics and whether each is the default (one, normally)."""
        return list(dict.fromkeys((t.headline, t.headline_default) for t in self.trials
                                  if t.headline is not None))

    @property
    def headline_text(self) -> str:
        """`metric: match/accuracy (headline; default: first scorer's first metric)`."""
        named = self.headlines
        if len(named) == 1:
            return f"metric: {describe_headline(*named[0])}"
        if not named:
            return "metric: none (no trial has scored samples)"
        return ("metric: differs between trials (" + "; ".join(
            f"{t.id} {t.headline}" for t in self.trials if t.headline) + ")")

    @property
    def missing(self) -> list[MissingTrial]:
        return [MissingTrial(t.id, t.label, t.status, t.detail)
                for t in self.trials if not t.has_results]

    @property
    def compared(self) -> list[TrialResult]:
        return [t for t in self.trials if t.comparison is not None]

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "experiment": self.experiment, "path": str(self.path), "metric": self.metric,
            "headline": {"text": self.headline_text, "metrics": [
                {"metric": name, "default": default} for name, default in self.headlines]},
            "confidence": self.confidence, "store": self.store_url,
            "report_dir": None if self.report_dir is None else str(self.report_dir),
            "files": [str(f) for f in self.files],
            "trials": [t.to_dict() for t in self.trials],
            "missing": [{"id": m.id, "label": m.label, "reason": m.reason, "detail": m.detail}
                        for m in self.missing],
            "compute": [c.to_dict() for c in self.compute],
        })

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Computing


def analyze(
    experiment_path: Path,
    *,
    output: Path | None = None,
    formats: set[str] | None = None,
    database_url: str | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> Analysis:
    """Load the experiment into the store, compute its analysis from the store, and write
    the report (`formats` of md, html, csv; default all; an empty set writes nothing) into
    `output` (default `<experiment>/report/`). Raises CruijffError when no trial has results."""
    formats = set(FORMATS if formats is None else formats)
    unknown = formats - FORMATS
    if unknown:
        raise CruijffError(f"unknown report format {sorted(unknown)[0]!r}: use "
                           f"{', '.join(sorted(FORMATS))}")
    path = Path(experiment_path).expanduser().resolve()
    if not (path / "config.yaml").is_file():
        raise CruijffError(f"{path} is not a cruijff experiment (no config.yaml): "
                           "build one with `cruijff build`")
    trials = experiment_config(path)["trials"]
    check_contained(path, [path / trial_dir_name(t["id"]) for t in trials])
    evals = {t["id"]: read_record(path / trial_dir_name(t["id"]),
                                  scoring_stage(t.get("stages") or list(DEFAULT_PIPELINE))
                                  or "eval") for t in trials}
    if not any(r is not None and r.is_done for r in evals.values()):
        words = run_states(path, [t["id"] for t in trials[:5]])
        recorded = {i: (r.status if r else "pending", None) for i, r in evals.items()}
        states = "; ".join(f"{t['id']} ({t.get('label', '')}): "
                           f"{words.get(t['id'], recorded[t['id']])[0]}"
                           for t in trials[:5])  # checked before creating a store for nothing
        raise CruijffError(f"experiment at {path} has no results yet: no trial has a finished "
                           f"eval ({states}); run it first: cruijff run {path}")
    with open_store(database_url, path) as store:
        load = load_experiment_results(store, path)
        try:
            analysis = compute_analysis(store, path, confidence=confidence, seed=seed)
        except SQLAlchemyError as exc:  # e.g. still locked after busy_timeout: one line
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise CruijffError(f"cannot read results from {store.url}: {reason}") from None
    analysis.load = load
    words = run_states(path, [t.id for t in analysis.trials
                              if not t.has_results and t.status != "unreadable"])
    for trial in analysis.trials:
        if trial.id in words:
            trial.status, detail = words[trial.id]
            trial.detail = detail or trial.detail
    if not any(t.has_results for t in analysis.trials):
        lines = "; ".join(m.describe() for m in analysis.missing[:5])
        raise CruijffError(f"experiment {analysis.experiment} has no results yet: no trial "
                           f"has a finished eval ({lines})")
    if formats:
        write_report(analysis, output or path / REPORT_DIR, formats)
    return analysis


def run_states(path: Path, trial_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """Per trial, its scoring stage's state in the words `run`, `progress` and `summary` use
    (runner.trial_states: pending, blocked, running, interrupted, failed, ...), with what
    blocks it; {} where the experiment cannot be read as a run reads it (the store's words
    stand then)."""
    from cruijff.models import fingerprints_once
    from cruijff.runner import load_experiment, trial_states, unlocked

    if not trial_ids:
        return {}
    unreadable = (CruijffError, OSError, KeyError, TypeError, ValueError)
    try:
        experiment = load_experiment(path)
        held = not unlocked(experiment)
    except unreadable:  # e.g. written by an older cruijff, or not by a build
        return {}
    words: dict[str, tuple[str, str | None]] = {}
    with fingerprints_once():
        for trial in experiment.trials:
            scoring = scoring_stage(trial.stages) if trial.id in trial_ids else None
            if scoring is None:
                continue
            try:
                states = trial_states(trial, trial.stages, held=held)
            except unreadable:
                continue
            state = states[scoring]
            stopped = next((f"{stage} {s.state}" for stage, s in states.items()
                            if s.state in ("failed", "interrupted")), None)
            words[trial.id] = (state.state,
                               stopped if state.state == "blocked" else state.detail)
    return words


def compute_analysis(store: Store, experiment_path: Path, *, confidence: float = 0.95,
                     seed: int = 0) -> Analysis:
    """The analysis of an experiment already loaded into the store (reads only the store)."""
    path = Path(experiment_path).expanduser().resolve()
    with store.session(snapshot=True) as session:  # not half of a load another analyze makes
        exp = session.scalars(select(ExperimentRow).where(
            ExperimentRow.path == str(path)).order_by(ExperimentRow.id.desc())).first()
        if exp is None:
            raise CruijffError(f"the results store {store.url} has no experiment at {path}: "
                               "load it first")
        trials = session.scalars(select(TrialRow).where(TrialRow.experiment_id == exp.id)
                                 .order_by(TrialRow.position)).all()
        pks = select(TrialRow.id).where(TrialRow.experiment_id == exp.id).scalar_subquery()
        samples: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for pk, sample_id, score in session.execute(
            select(SampleRow.trial_pk, SampleRow.sample_id, SampleRow.score)
            .join(TrialRow, (TrialRow.id == SampleRow.trial_pk)
                  & (TrialRow.scorer == SampleRow.scorer))
            .where(TrialRow.experiment_id == exp.id)
        ):
            samples[pk][sample_id].append(score)
        losses: dict[int, list[float | None]] = defaultdict(list)
        for pk, loss in session.execute(select(LossRow.trial_pk, LossRow.loss)
                                        .where(LossRow.trial_pk.in_(pks))
                                        .order_by(LossRow.trial_pk, LossRow.step)):
            losses[pk].append(loss)
        last_loss = dict(session.execute(
            select(MetricRow.trial_pk, MetricRow.value).where(
                MetricRow.trial_pk.in_(pks), MetricRow.name == "loss_last")).all())
        ran = session.scalars(select(MetricRow.stage).distinct()
                              .where(MetricRow.trial_pk.in_(pks))).all()
        scored = [stage for stage in ran if stage in STAGES and STAGES[stage].scores]
        scorer_metrics: dict[int, dict[str, float | None]] = defaultdict(dict)
        for pk, metric, value in session.execute(
                select(MetricRow.trial_pk, MetricRow.name, MetricRow.value)
                .where(MetricRow.trial_pk.in_(pks), MetricRow.stage.in_(scored))
                .order_by(MetricRow.id)):
            if metric not in BOOKKEEPING:
                scorer_metrics[pk][metric] = value
        wall = dict(session.execute(
            select(StageRunRow.trial_pk, func.sum(StageRunRow.duration_s))
            .where(StageRunRow.trial_pk.in_(pks)).group_by(StageRunRow.trial_pk)).all())
        compute = [_stage_compute(trial_id, label, run) for trial_id, label, run in
                   session.execute(select(TrialRow.trial_id, TrialRow.label, StageRunRow)
                                   .select_from(StageRunRow)
                                   .join(TrialRow, TrialRow.id == StageRunRow.trial_pk)
                                   .where(TrialRow.experiment_id == exp.id)
                                   .order_by(TrialRow.position, StageRunRow.id))]
        name = exp.name
        rows = [(t.id, t.trial_id, t.label, t.model, t.dataset, t.control, t.eval_status,
                 t.eval_detail, t.scorer, ARMS[(t.use_fine_tune, t.use_prompt_opt)])
                for t in trials]
        headlines = {t.id: (t.metric, t.metric_default) for t in trials}

    # Per sample id, the mean over epochs: samples, not epochs, are the independent units.
    scores = {pk: {sid: sum(v) / len(v) for sid, v in by_id.items()}
              for pk, by_id in samples.items()}
    # 0/1 statistics only where every trial's scores are 0/1: an error count or partial
    # credit that happens to be all 0 or 1 in one trial is still not a proportion
    binary = all(is_binary(list(s.values())) for s in scores.values()) and bool(scores)
    results: list[TrialResult] = []
    by_id: dict[str, tuple[TrialResult, dict[str, float]]] = {}
    for pk, trial_id, label, model, dataset, control, status, detail, scorer, arm in rows:
        mine = scores.get(pk, {})
        result = TrialResult(trial_id, label, model, dataset, control,
                             "ok" if status == "done" and mine else status, detail, scorer,
                             arm=arm, metrics=scorer_metrics.get(pk, {}))
        result.headline, result.headline_default = headlines[pk]
        if status == "done" and not mine:
            result.status, result.detail = "unreadable", "no scored samples in the store"
        if mine:
            result.estimate = mean_estimate(list(mine.values()), confidence, seed=seed,
                                            binary=binary)
        finite = [x for x in losses.get(pk, []) if x is not None]
        result.losses = losses.get(pk, [])
        result.final_loss = finite[-1] if finite else last_loss.get(pk)
        result.wall_s = None if wall.get(pk) is None else round(wall[pk], 3)
        results.append(result)
        by_id[trial_id] = (result, mine)

    for result in results:
        if result.control is None or not result.has_results:
            continue
        control, control_scores = by_id.get(result.control, (None, {}))
        if control is None or not control.has_results:
            result.note = f"control {result.control} has no results"
            continue
        if control.headline != result.headline:
            result.note = (f"not compared: control {control.id}'s headline is "
                           f"{control.headline}, this trial's {result.headline}")
            continue
        try:
            result.comparison = compare(by_id[result.id][1], control_scores, confidence,
                                        seed=seed, binary=binary)
        except ValueError as exc:
            result.note = str(exc)
    for run in compute:  # a reused fine-tune's losses are its owner's run's, not a second run
        trial, owner = by_id.get(run.trial), by_id.get(run.reused_from or "")
        if (trial is not None and owner is not None and trial[0].losses
                and trial[0].losses == owner[0].losses):
            trial[0].losses_from = owner[0].id
    compared = [r for r in results if r.comparison is not None]
    for result, adjusted in zip(compared, holm([r.comparison.p_value for r in compared]),
                                strict=True):
        result.p_holm = adjusted

    return Analysis(name, path, "accuracy" if binary else "mean score", confidence, results,
                    store.url, compute=compute, seed=seed)


BOOKKEEPING = frozenset({"samples", "headline_value", "headline_default"})
"""An eval record's metrics that are not a scorer's (the scorer_metrics leave them out)."""


def _stage_compute(trial_id: str, label: str, run: StageRunRow) -> StageCompute:
    """A stage run's compute figures as cruijff.utilization reads them off a record."""
    rss = [v for v in (run.peak_rss_mib, run.sacct_max_rss_mib) if v is not None]
    use = AttemptUse(
        attempt=run.attempts, status=run.status, wall_s=run.wall_s, cpu_s=run.cpu_s,
        peak_rss_mib=max(rss) if rss else None, gpu_peak_mib=run.gpu_peak_mib,
        asked_mem_mib=run.requested_mem_mib, asked_time_s=run.requested_time_s,
        outcome=run.outcome, sacct_state=run.sacct_state,
        sacct_max_rss_mib=run.sacct_max_rss_mib, throughput=dict(run.throughput or {}),
        size=dict(run.size or {}), final=run.usage_final,
        measured=bool(rss) or run.cpu_s is not None or run.usage_final is not None)
    return StageCompute(trial_id, label, run.stage, run.status, run.reused_from,
                        with_shares(use))


# ---------------------------------------------------------------------------------------------
# Writing


def write_report(analysis: Analysis, folder: Path, formats: set[str] | None = None) -> list[Path]:
    """Write the report files into `folder`; returns (and records on analysis) their paths."""
    formats = set(FORMATS if formats is None else formats)
    folder = Path(folder).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CruijffError(f"cannot create report folder {folder}: {exc.strerror}") from None
    writers = {"csv": ("results.csv", results_csv), "md": ("report.md", report_markdown),
               "html": ("report.html", report_html)}
    files = []
    for fmt in ("csv", "md", "html"):
        if fmt in formats:
            name, render = writers[fmt]
            atomic_write_text(folder / name, render(analysis))
            files.append(folder / name)
    analysis.report_dir, analysis.files = folder, files
    return files


def _csv_number(x: float | int | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return repr(x) if isinstance(x, float) else str(x)


def csv_rows(analysis: Analysis) -> list[dict[str, str]]:
    rows = []
    for t in analysis.trials:
        est, cmp = t.estimate, t.comparison
        rows.append({
            "id": t.id, "label": t.label, "model": t.model, "dataset": t.dataset,
            "metric": _csv_number(est and est.value), "ci_low": _csv_number(est and est.low),
            "ci_high": _csv_number(est and est.high), "n": _csv_number(est and est.n),
            "diff_vs_control": _csv_number(cmp and cmp.difference),
            "diff_low": _csv_number(cmp and cmp.low), "diff_high": _csv_number(cmp and cmp.high),
            "p": _csv_number(cmp and cmp.p_value), "p_holm": _csv_number(t.p_holm),
            "method": cmp.method if cmp else "", "final_loss": _csv_number(t.final_loss),
            "wall_s": _csv_number(t.wall_s), "control": t.control or "",
            "n_pairs": _csv_number(cmp and cmp.n), "ci_method": est.method if est else "",
            "status": t.status, "headline": t.headline or "",
            "headline_default": "" if t.headline_default is None
            else str(t.headline_default).lower(),
            "scorer_metrics": json.dumps(json_safe(t.metrics), allow_nan=False)
            if t.metrics else "",
        })
    return rows


def results_csv(analysis: Analysis) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(analysis))
    return buffer.getvalue()


def _f(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}"


def _p(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.2g}" if x < 0.001 else f"{x:.3f}"


def _interval(low: float | None, high: float | None) -> str:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "–"
    return f"[{low:.3f}, {high:.3f}]"


def _wall(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _display_rows(analysis: Analysis) -> list[list[str]]:
    """The cells shared by the terminal, Markdown and HTML tables."""
    rows = []
    for t in analysis.trials:
        est, cmp = t.estimate, t.comparison
        if cmp is not None:
            diff = f"{cmp.difference:+.3f} {_interval(cmp.low, cmp.high)}"
        elif t.control is None:
            diff = "(control)" if t.has_results else "–"
        else:
            diff = t.note or "–"
        rows.append([
            t.id, t.label,
            f"{est.value:.3f} {_interval(est.low, est.high)}" if est else t.status,
            str(est.n) if est else "–", diff, _p(cmp.p_value) if cmp else "–",
            _p(t.p_holm), _f(t.final_loss, 4), _wall(t.wall_s),
        ])
    return rows


def _headers(analysis: Analysis) -> list[str]:
    pct = f"{analysis.confidence:.0%}"
    return ["trial", "label", f"{analysis.metric} [{pct} CI]", "n",
            f"Δ vs control [{pct} CI]", "p", "p (Holm)", "final loss", "wall time"]


def analysis_table(analysis: Analysis) -> Any:
    """The analysis as a rich Table (what `cruijff analyze` prints)."""
    from rich.table import Table

    table = Table(title=f"{analysis.experiment}: {analysis.metric} per trial; "
                  f"{analysis.headline_text}", caption=" ".join(_method_lines(analysis)))
    for header in _headers(analysis):
        table.add_column(header, overflow="fold",
                         justify="left" if header in ("trial", "label") else "right")
    for t, cells in zip(analysis.trials, _display_rows(analysis), strict=True):
        if not t.has_results:
            table.add_row(*cells, style="red")
        elif t.p_holm is not None and t.p_holm <= ALPHA:
            table.add_row(*cells, style="bold")
        else:
            table.add_row(*cells)
    return table


ARMS = {(False, False): "base", (False, True): "prompt-opt", (True, False): "fine-tune",
        (True, True): "both"}


def arm_rows(analysis: Analysis) -> list[list[str]]:
    """Prompt-opt vs fine-tune vs both (vs neither): the best trial of each arm, when the
    design has more than one; empty otherwise."""
    arms: dict[str, list[TrialResult]] = {}
    for trial in analysis.trials:
        if trial.has_results:
            arms.setdefault(trial.arm, []).append(trial)
    if len(arms) < 2:
        return []
    rows = []
    for arm in ("base", "prompt-opt", "fine-tune", "both"):
        if arm in arms:
            best = max(arms[arm], key=lambda t: t.estimate.value)
            rows.append([arm, str(len(arms[arm])), f"{best.id} ({best.label})",
                         _f(best.estimate.value),
                         _interval(best.estimate.low, best.estimate.high)])
    return rows


ARM_HEADERS = ["adaptation", "trials", "best trial", "metric", "95% CI"]


def _summary_lines(analysis: Analysis) -> list[str]:
    done = sum(t.has_results for t in analysis.trials)
    text = analysis.headline_text
    lines = [f"{text[0].upper()}{text[1:]}.",
             f"{done} of {len(analysis.trials)} trials have results."]
    significant = [t for t in analysis.compared if t.p_holm is not None and t.p_holm <= ALPHA]
    if analysis.compared:
        lines.append(f"{len(significant)} of {len(analysis.compared)} treatments differ from "
                     f"their control at Holm-adjusted p ≤ {ALPHA}.")
    return lines


METHODS = (
    "The metric is the mean per-sample score of the headline metric's scorer (per sample "
    "averaged over epochs; CORRECT/INCORRECT/PARTIAL count 1/0/0.5, numbers as they are); "
    "0/1 scores get a Wilson interval, others (partial credit, continuous scores) a seeded "
    "percentile bootstrap. Each treatment is compared with its control on the samples both "
    "scored, as pairs: McNemar's exact test with Newcombe's interval for 0/1 scores, else a "
    "paired bootstrap. Δ is treatment minus control, and wins/losses count the samples where "
    "the treatment scores higher/lower: for a metric where lower is better (an error), a "
    "negative Δ is the improvement. p-values are adjusted across all treatments with Holm's "
    "method. Every scorer's own metrics (as Inspect computed them) are listed beside it."
)

CI_METHODS = {"wilson": "Wilson score interval (0/1 scores)",
              "bootstrap": "percentile bootstrap of the mean score ({resamples:,} resamples, "
                           "seed {seed})"}
TEST_METHODS = {"mcnemar-exact": "McNemar's exact test with Newcombe's interval (0/1 pairs)",
                "paired-bootstrap": "paired bootstrap of the mean difference ({resamples:,} "
                                    "resamples, seed {seed})"}


def _method_lines(analysis: Analysis) -> list[str]:
    """Which interval and which test each trial got, named: `Intervals: Wilson score
    interval (0/1 scores) for a, b; percentile bootstrap of the mean score (...) for c.`"""
    def named(kind: str, methods: dict[str, str], used: dict[str, str]) -> str:
        groups: dict[str, list[str]] = defaultdict(list)
        for trial, method in used.items():
            groups[method].append(trial)
        return f"{kind}: " + "; ".join(
            methods.get(method, method).format(resamples=RESAMPLES, seed=analysis.seed)
            + f" for {', '.join(trials)}" for method, trials in groups.items()) + "."

    intervals = {t.id: t.estimate.method for t in analysis.trials if t.estimate}
    tests = {t.id: t.comparison.method for t in analysis.compared if t.comparison}
    return ([named("Intervals", CI_METHODS, intervals)] if intervals else []) + (
        [named("Tests vs control", TEST_METHODS, tests)] if tests else [])


def scorer_metric_table(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    """Every scorer's metrics per trial (headers, rows): Inspect's own figures, the headline's
    scorer and the others alike; empty when no trial has any."""
    names = list(dict.fromkeys(m for t in analysis.trials for m in t.metrics))
    rows = [[t.id, t.label, *(_f(t.metrics.get(m)) for m in names)]
            for t in analysis.trials if t.metrics]
    return (["trial", "label", *names], rows) if rows else ([], [])


COMPUTE_HEADERS = ["trial", "stage", "wall", "CPU", "peak RSS", "GPU peak", "asked", "use %",
                   "outcome", "throughput"]
COMPUTE_NOTE = (f"Use % is what a stage used of what its Slurm job asked for (memory: the most "
                f"of cruijff's and Slurm's peak RSS; time: wall): ▽ below "
                f"{LOW_SHARE:.0%}, ▲ above {HIGH_SHARE:.0%}. Local stages ask for nothing.")


def _dash(text: str) -> str:
    return text or "–"


def compute_rows(analysis: Analysis) -> list[list[str]]:
    """The cells of the compute table (Markdown and HTML), a row per stage run."""
    rows = []
    for c in analysis.compute:
        u = c.use
        asked = [memory_text(u.asked_mem_mib) if u.asked_mem_mib else "",
                 duration_text(u.asked_time_s) if u.asked_time_s else ""]
        shares = [f"mem {share_text(u.mem_share)}" if u.mem_share is not None else "",
                  f"time {share_text(u.time_share)}" if u.time_share is not None else ""]
        outcome = u.outcome or (f"reused from {c.reused_from}" if c.reused_from else c.status)
        if u.final is False:
            outcome += " (last snapshot)"
        gpu = ""
        if u.gpu_peak_mib:
            gpu = (f"{u.gpus}× " if u.gpus > 1 else "") + memory_text(u.gpu_peak_mib)
        rows.append([
            c.trial, c.stage,
            _dash(duration_text(u.wall_s) if u.wall_s is not None else ""),
            _dash(duration_text(u.cpu_s) if u.cpu_s is not None else ""),
            _dash(memory_text(u.peak_rss_mib) if u.peak_rss_mib is not None else ""), _dash(gpu),
            _dash(" · ".join(a for a in asked if a)), _dash(" · ".join(x for x in shares if x)),
            outcome, _dash(throughput_text(u.throughput)),
        ])
    return rows


def _compute_lines(analysis: Analysis) -> list[str]:
    if any(c.use.measured for c in analysis.compute):
        return [COMPUTE_NOTE]
    return ["No stage attempt was measured (records from before cruijff measured what stages "
            "use): wall times only."]


SCORER_METRICS_NOTE = ("Inspect's own figures from each eval log (a scorer's name before the "
                       "slash where the task has several); the table above reads the "
                       "headline's scorer.")


def report_markdown(analysis: Analysis) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    out = [f"# {analysis.experiment}: results", "", *_summary_lines(analysis),
           *_method_lines(analysis), ""]
    headers = _headers(analysis)
    out.append("| " + " | ".join(headers) + " |")
    out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|")
    out.extend("| " + " | ".join(cell(c) for c in row) + " |" for row in _display_rows(analysis))
    if arms := arm_rows(analysis):
        out += ["", "## Prompt optimization vs fine-tuning", "",
                "| " + " | ".join(ARM_HEADERS) + " |", "|---|---:|---|---:|---:|"]
        out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in arms]
    if analysis.missing:
        out += ["", "## Trials without results", ""]
        out += [f"- {cell(m.describe())}" for m in analysis.missing]
    metric_headers, metric_rows = scorer_metric_table(analysis)
    if metric_rows:
        out += ["", "## Every scorer's metrics", "", SCORER_METRICS_NOTE, "",
                "| " + " | ".join(cell(h) for h in metric_headers) + " |",
                "|---|---|" + "---:|" * (len(metric_headers) - 2)]
        out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in metric_rows]
    if analysis.compute:
        out += ["", "## Compute", "", *_compute_lines(analysis), "",
                "| " + " | ".join(COMPUTE_HEADERS) + " |",
                "|---|---|" + "---:|" * 6 + "---|---:|"]
        out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in compute_rows(analysis)]
    out += ["", "## Methods", "", METHODS, "",
            "Plots: report.html. Numbers: results.csv.", ""]
    return "\n".join(out)


# --- HTML and SVG ------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; text-align: right;
         white-space: nowrap; }
td:nth-child(2) { white-space: normal; overflow-wrap: anywhere; min-width: 8em; }
th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
tr.missing td { color: #b00020; }
tr.significant td { font-weight: bold; }
svg.plot { display: block; margin: 0.5em 0 2em; background: #fff; max-width: 100%;
           height: auto; }
table { display: block; overflow-x: auto; max-width: 100%; }
@media (max-width: 700px) { body { margin: 0.6em; } }
svg text { font-size: 11px; fill: #333; }
.axis line, .grid { stroke: #ccc; }
.ci { stroke: #1f77b4; stroke-width: 2; }
.point { fill: #1f77b4; }
.significant .ci { stroke: #d62728; }
.significant .point { fill: #d62728; }
.zero { stroke: #555; stroke-dasharray: 4 3; }
.loss-curve { fill: none; stroke-width: 1.5; }
.loss-marker { stroke: #fff; stroke-width: 0.5; }
#compute tr[data-outcome] td { color: #b00020; }
rect.memory { fill: #1f77b4; }
rect.memory.oom { fill: #d62728; }
line.asked { stroke: #222; stroke-width: 2; }
"""

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
LEFT, PLOT_W, RIGHT, ROW_H, TOP, BOTTOM = 190, 560, 30, 18, 30, 40
FONT_PX = 11
"""svg text's size (CSS above): what label widths are estimated at."""
LABEL_CHARS = 64
"""A plot's trial label is cut (with …) beyond this many characters; its title has it whole."""
_EM = {**dict.fromkeys(" ,.:;'!|/\\[]()", 0.40), **dict.fromkeys("iljIJ", 0.30),
       **dict.fromkeys("frt", 0.42), **dict.fromkeys("mwMW%@", 1.0),
       **dict.fromkeys("+=<>^~#&", 0.84), **dict.fromkeys("ABCDGHKNOQRUVXYZ", 0.79)}
"""Character widths in em, a little over DejaVu Sans's (the wide fallback a headless browser
uses): labels are measured generously so that no font cuts them off."""


def _text_px(text: str, size: float = FONT_PX) -> float:
    """An upper estimate of `text`'s width in pixels (SVG text cannot be measured here)."""
    return size * sum(_EM.get(ch, 0.66 if ord(ch) < 0x2000 else 1.0) for ch in text)


def _label_margin(labels: list[str], least: float = 60.0) -> float:
    """The left margin that holds the longest label (right-aligned at margin - 8) whole."""
    return max([least, *(math.ceil(_text_px(label)) + 16 for label in labels)])


def _trial_label(trial_id: str, label: str) -> str:
    return _short(f"{trial_id}: {label}", LABEL_CHARS)


def _ticks(lo: float, hi: float, count: int = 8) -> list[float]:
    """About `count` round values covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * step >= raw:
            step *= m
            break
    first = math.ceil(lo / step - 1e-9)
    return [round(i * step, 10) for i in range(first, math.floor(hi / step + 1e-9) + 1)]


def _short(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _x_axis(lo: float, hi: float, x, y0: float, y1: float, label: str,
            left: float = LEFT) -> list[str]:
    parts = ['<g class="axis">']
    for tick in _ticks(lo, hi):
        parts.append(f'<line class="grid" x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{y0}" '
                     f'y2="{y1}"/><text x="{x(tick):.1f}" y="{y1 + 14}" '
                     f'text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{left + PLOT_W / 2}" y="{y1 + 30}" text-anchor="middle">'
                 f'{html.escape(label)}</text></g>')
    return parts


def _svg_open(plot_id: str, width: float, height: float) -> str:
    return (f'<svg class="plot" id="{plot_id}" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">')


def _empty_plot(plot_id: str, width: float, height: float, text: str) -> str:
    """A plot with nothing to draw says why, where the plot would be."""
    return (f'{_svg_open(plot_id, width, height)}<text x="{width / 2}" y="{TOP + 10}" '
            f'text-anchor="middle">{html.escape(text)}</text></svg>')


def _interval_plot(plot_id: str, rows: list[tuple[TrialResult, float, float, float]],
                   lo: float, hi: float, label: str, zero: bool, empty: str) -> str:
    """Points with interval bars, one row per trial (a forest plot)."""
    height = TOP + max(1, len(rows)) * ROW_H + BOTTOM
    left = _label_margin([_trial_label(t.id, t.label) for t, *_ in rows])
    width = left + PLOT_W + RIGHT
    if not rows:
        return _empty_plot(plot_id, width, height, empty)
    parts = [_svg_open(plot_id, width, height)]

    def x(v: float) -> float:
        return left + (min(max(v, lo), hi) - lo) / (hi - lo) * PLOT_W

    y_end = TOP + len(rows) * ROW_H
    parts += _x_axis(lo, hi, x, TOP - 6, y_end, label, left)
    if zero:
        parts.append(f'<line class="zero" x1="{x(0):.1f}" x2="{x(0):.1f}" y1="{TOP - 6}" '
                     f'y2="{y_end}"/>')
    for i, (t, value, low, high) in enumerate(rows):
        y = TOP + i * ROW_H + ROW_H / 2
        cls = "trial significant" if t.p_holm is not None and t.p_holm <= ALPHA else "trial"
        name = html.escape(f"{t.id}: {t.label}")
        parts.append(f'<g class="{cls}" data-trial="{html.escape(t.id)}"><title>{name}: '
                     f'{value:.3f} {_interval(low, high)}</title>'
                     f'<text class="label" x="{left - 8}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{html.escape(_trial_label(t.id, t.label))}</text>')
        if math.isfinite(low) and math.isfinite(high):
            parts.append(f'<line class="ci" x1="{x(low):.1f}" x2="{x(high):.1f}" '
                         f'y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<circle class="point" cx="{x(value):.1f}" cy="{y:.1f}" r="4"/></g>')
    parts.append("</svg>")
    return "".join(parts)


def _domain(values: list[float], include_zero: bool) -> tuple[float, float]:
    """[min, max] of the finite values (and 0), padded by 5 %."""
    finite = [v for v in values if math.isfinite(v)] + ([0.0] if include_zero else [])
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.05 or max(abs(hi), 1.0) * 0.05
    return lo - pad, hi + pad


def metric_plot(analysis: Analysis) -> str:
    rows = [(t, t.estimate.value, t.estimate.low, t.estimate.high)
            for t in analysis.trials if t.estimate is not None]
    binary = analysis.metric == "accuracy"
    lo, hi = (0.0, 1.0) if binary or not rows else _domain(
        [v for r in rows for v in r[1:]], False)
    return _interval_plot("metric-plot", rows, lo, hi,
                          f"{analysis.metric} ({analysis.confidence:.0%} CI)", False,
                          "no trial has results")


def diff_plot(analysis: Analysis) -> str:
    rows = [(t, t.comparison.difference, t.comparison.low, t.comparison.high)
            for t in analysis.compared]
    lo, hi = (-1.0, 1.0) if not rows else _domain(
        [v for r in rows for v in r[1:]], True)
    if analysis.metric == "accuracy":
        lo, hi = max(lo, -1.0), min(hi, 1.0)
    return _interval_plot("diff-plot", rows, lo, hi,
                          f"difference vs control ({analysis.confidence:.0%} CI; red: "
                          f"Holm p ≤ {ALPHA})", True, "no treatment has a control with results")


MAX_POINTS = 400
MAX_LEGEND = 20


def loss_plot(analysis: Analysis) -> str:
    """One curve per fine-tune run: a trial that reused another's run is named in that run's
    legend line ("reused from a"), not drawn again on top of it. Longer curves are drawn
    first, so a shorter one lies on top; short curves get markers besides."""
    curves = [(t, [(i + 1, v) for i, v in enumerate(t.losses) if v is not None])
              for t in analysis.trials if any(v is not None for v in t.losses)]
    owners = {t.id for t, _ in curves}
    reusers: dict[str, list[TrialResult]] = defaultdict(list)
    for t, _ in curves:
        if t.losses_from in owners and t.losses_from != t.id:
            reusers[str(t.losses_from)].append(t)
    reused = {r.id for group in reusers.values() for r in group}
    drawn = [(t, pts) for t, pts in curves if t.id not in reused]
    legend: list[tuple[TrialResult, str | None]] = []  # (trial, whose run it reused)
    for t, _ in drawn:
        legend.append((t, None))
        legend += [(r, t.id) for r in reusers.get(t.id, [])]
    texts = [_legend_text(t, owner) for t, owner in legend[:MAX_LEGEND]]
    width = max(LEFT + PLOT_W + RIGHT,
                LEFT + 26 + max((math.ceil(_text_px(x)) for x in texts), default=0) + 8)
    legend_rows = min(len(legend), MAX_LEGEND) + (len(legend) > MAX_LEGEND)
    height = 320 + legend_rows * 14
    if not drawn:
        return _empty_plot("loss-plot", width, height, "no fine-tuning losses")
    parts = [_svg_open("loss-plot", width, height)]
    values = [v for _, pts in drawn for _, v in pts]
    steps = max(s for _, pts in drawn for s, _ in pts)
    log = min(values) > 0 and max(values) / min(values) > 50
    ty = math.log10 if log else (lambda v: v)
    y_lo, y_hi = ty(min(values)), ty(max(values))
    if y_hi <= y_lo:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    y0, y1 = TOP, TOP + 240

    def x(step: float) -> float:
        return LEFT + (step - 1) / max(steps - 1, 1) * PLOT_W

    def y(v: float) -> float:
        return y1 - (ty(v) - y_lo) / (y_hi - y_lo) * (y1 - y0)

    parts.append('<g class="axis">')
    for tick in _ticks(1, steps):
        parts.append(f'<line class="grid" x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{y0}" '
                     f'y2="{y1}"/><text x="{x(tick):.1f}" y="{y1 + 14}" '
                     f'text-anchor="middle">{tick:g}</text>')
    for tick in _ticks(y_lo, y_hi):
        shown = f"{10 ** tick:.3g}" if log else f"{tick:g}"
        yy = y1 - (tick - y_lo) / (y_hi - y_lo) * (y1 - y0)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{yy:.1f}" '
                     f'y2="{yy:.1f}"/><text x="{LEFT - 6}" y="{yy + 4:.1f}" '
                     f'text-anchor="end">{shown}</text>')
    parts.append(f'<text x="{LEFT + PLOT_W / 2}" y="{y1 + 30}" text-anchor="middle">'
                 f'step</text><text x="{LEFT - 50}" y="{y0 - 10}" text-anchor="middle">'
                 f'loss{" (log scale)" if log else ""}</text></g>')
    colours = {t.id: PALETTE[i % len(PALETTE)] for i, (t, _) in enumerate(drawn)}
    for t, pts in sorted(drawn, key=lambda c: -c[1][-1][0]):  # stable: longest first
        stride = max(1, math.ceil(len(pts) / MAX_POINTS))
        kept = pts[::stride] if pts[-1] in pts[::stride] else [*pts[::stride], pts[-1]]
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in kept)
        names = " ".join(r.id for r in reusers.get(t.id, []))
        shared = f' data-reused-by="{html.escape(names)}"' if names else ""
        title = f"{t.id}: {t.label}" + (f" (reused by {', '.join(names.split())})"
                                         if names else "")
        parts.append(f'<g class="loss" data-trial="{html.escape(t.id)}"{shared}>'
                     f'<title>{html.escape(title)}</title><polyline class="loss-curve" '
                     f'data-trial="{html.escape(t.id)}" stroke="{colours[t.id]}" '
                     f'points="{coords}"/>')
        if len(kept) <= MARKED_POINTS or pts[-1][0] * 4 <= steps:
            parts += [f'<circle class="loss-marker" cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" '
                      f'fill="{colours[t.id]}"/>' for s, v in kept]
        parts.append("</g>")
    for i, ((t, owner), text) in enumerate(zip(legend, texts, strict=False)):
        ly = y1 + 48 + i * 14
        dash = ' stroke-dasharray="4 3"' if owner else ""
        parts.append(f'<g class="legend" data-trial="{html.escape(t.id)}"><line x1="{LEFT}" '
                     f'x2="{LEFT + 20}" y1="{ly - 4}" y2="{ly - 4}" '
                     f'stroke="{colours[owner or t.id]}" stroke-width="2"{dash}/>'
                     f'<text x="{LEFT + 26}" y="{ly}">{html.escape(text)}</text></g>')
    if len(legend) > MAX_LEGEND:
        parts.append(f'<text x="{LEFT}" y="{y1 + 48 + MAX_LEGEND * 14}">… and '
                     f'{len(legend) - MAX_LEGEND} more trials</text>')
    parts.append("</svg>")
    return "".join(parts)


MARKED_POINTS = 30
"""A curve of at most this many points (or a quarter of the longest's steps) gets markers."""


def _legend_text(trial: TrialResult, owner: str | None) -> str:
    """A loss legend line: the trial, and for one that reused a fine-tune, whose."""
    suffix = f" — reused from {owner}" if owner else ""
    return _short(f"{trial.id}: {trial.label}", 80 - len(suffix)) + suffix


PANEL_W, PANEL_GAP = 250, 60
"""The compute plot's two panels (wall time per stage, peak memory) side by side."""


def _time_unit(seconds: float) -> tuple[float, str]:
    return (1.0, "s") if seconds < 120 else (60.0, "min") if seconds < 7200 else (3600.0, "h")


def _memory_unit(mib: float) -> tuple[float, str]:
    return (1.0, "MiB") if mib < 1024 else (1024.0, "GiB")


def _panel(left: float, hi: float, y0: float, y1: float, label: str) -> tuple[list[str], Any]:
    """A horizontal axis from 0 to `hi` starting at x=`left`: its grid and the x mapping."""
    def x(v: float) -> float:
        return left + min(max(v, 0.0), hi) / hi * PANEL_W

    parts = ['<g class="axis">']
    for tick in _ticks(0.0, hi, 4):
        parts.append(f'<line class="grid" x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{y0}" '
                     f'y2="{y1}"/><text x="{x(tick):.1f}" y="{y1 + 14}" '
                     f'text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{left + PANEL_W / 2}" y="{y1 + 30}" text-anchor="middle">'
                 f'{html.escape(label)}</text></g>')
    return parts, x


def compute_plot(analysis: Analysis) -> str:
    """Per trial: wall time of each stage (stacked bars) and the most memory a stage held
    (a bar, with what its job asked for as a tick; red where Slurm ended it for memory)."""
    e = html.escape
    trials = list(dict.fromkeys(c.trial for c in analysis.compute
                                if c.use.wall_s is not None or c.use.peak_rss_mib is not None))
    stages = in_run_order([[c.stage for c in analysis.compute if c.trial == t]
                           for t in dict.fromkeys(c.trial for c in analysis.compute)])
    labels = {c.trial: c.label for c in analysis.compute}
    left = _label_margin([_trial_label(t, labels[t]) for t in trials])
    width = left + 2 * PANEL_W + PANEL_GAP + RIGHT
    height = TOP + max(1, len(trials)) * ROW_H + BOTTOM + 14 * len(stages) + 10
    if not trials:
        return _empty_plot("compute-plot", width, height,
                           "no stage has a wall time or memory figure")
    parts = [_svg_open("compute-plot", width, height)]
    runs: dict[str, list[StageCompute]] = defaultdict(list)
    for c in analysis.compute:
        runs[c.trial].append(c)
    walls = {t: sum(c.use.wall_s or 0.0 for c in runs[t]) for t in trials}
    peaks = {t: max((c for c in runs[t] if c.use.peak_rss_mib is not None),
                    key=lambda c: c.use.peak_rss_mib or 0.0, default=None) for t in trials}
    scale_t, unit_t = _time_unit(max(walls.values()))
    most_mib = max([c.use.peak_rss_mib or 0.0 for c in analysis.compute]
                   + [c.use.asked_mem_mib or 0.0 for c in peaks.values() if c])
    scale_m, unit_m = _memory_unit(most_mib)
    y_end = TOP + len(trials) * ROW_H
    time_axis, xt = _panel(left, max(walls.values()) / scale_t or 1.0, TOP - 6, y_end,
                           f"wall time per stage ({unit_t})")
    mem_left = left + PANEL_W + PANEL_GAP
    mem_axis, xm = _panel(mem_left, most_mib / scale_m or 1.0, TOP - 6, y_end,
                          f"peak memory ({unit_m}; tick: asked)")
    parts += time_axis + mem_axis
    colours = {stage: PALETTE[i % len(PALETTE)] for i, stage in enumerate(stages)}
    for i, trial in enumerate(trials):
        y = TOP + i * ROW_H + 3
        name = f"{trial}: {labels[trial]}"
        parts.append(f'<g class="trial" data-trial="{e(trial)}"><text class="label" '
                     f'x="{left - 8}" y="{y + 11:.1f}" text-anchor="end">'
                     f'{e(_trial_label(trial, labels[trial]))}</text>')
        start = 0.0
        for c in runs[trial]:
            if not c.use.wall_s:
                continue
            x0, x1 = xt(start / scale_t), xt((start + c.use.wall_s) / scale_t)
            parts.append(f'<rect class="wall" data-stage="{e(c.stage)}" x="{x0:.1f}" '
                         f'y="{y}" width="{max(x1 - x0, 0.5):.1f}" height="{ROW_H - 6}" '
                         f'fill="{colours[c.stage]}"><title>{e(name)}, {e(c.stage)}: '
                         f'{duration_text(c.use.wall_s)}</title></rect>')
            start += c.use.wall_s
        peak = peaks[trial]
        if peak is not None and peak.use.peak_rss_mib is not None:
            use = peak.use
            cls = "memory oom" if use.outcome == "OUT_OF_MEMORY" else "memory"
            asked = f" of {memory_text(use.asked_mem_mib)} asked" if use.asked_mem_mib else ""
            bar = max(xm(use.peak_rss_mib / scale_m) - mem_left, 0.5)
            parts.append(f'<rect class="{cls}" data-stage="{e(peak.stage)}" x="{mem_left}" '
                         f'y="{y}" width="{bar:.1f}" height="{ROW_H - 6}"><title>{e(name)}, '
                         f'{e(peak.stage)}: '
                         f'{memory_text(use.peak_rss_mib)}{asked}</title></rect>')
            if use.asked_mem_mib:
                xa = xm(use.asked_mem_mib / scale_m)
                parts.append(f'<line class="asked" x1="{xa:.1f}" x2="{xa:.1f}" y1="{y - 2}" '
                             f'y2="{y + ROW_H - 4}"/>')
        parts.append("</g>")
    for i, stage in enumerate(stages):
        ly = y_end + 48 + i * 14
        parts.append(f'<g class="legend"><rect x="{left}" y="{ly - 9}" width="20" height="10" '
                     f'fill="{colours[stage]}"/><text x="{left + 26}" y="{ly}">{e(stage)}'
                     f'</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def compute_html(analysis: Analysis) -> str:
    """The compute section: its note, a table of every stage run, and the plot."""
    e = html.escape
    if not analysis.compute:
        return ""
    head = "".join(f"<th>{e(h)}</th>" for h in COMPUTE_HEADERS)
    body = []
    for c, cells in zip(analysis.compute, compute_rows(analysis), strict=True):
        outcome = f' data-outcome="{e(c.use.outcome)}"' if c.use.outcome else ""
        tds = "".join(f"<td>{e(cell)}</td>" for cell in cells)
        body.append(f'<tr data-trial="{e(c.trial)}" data-stage="{e(c.stage)}"{outcome}>'
                    f"{tds}</tr>")
    notes = "".join(f"<p>{e(line)}</p>" for line in _compute_lines(analysis))
    return (f"<h2>Compute</h2>{notes}<table id=\"compute\"><thead><tr>{head}</tr></thead>"
            f"<tbody>\n{chr(10).join(body)}\n</tbody></table>\n{compute_plot(analysis)}")


def report_html(analysis: Analysis) -> str:
    e = html.escape
    headers = "".join(f"<th>{e(h)}</th>" for h in _headers(analysis))
    body = []
    for t, cells in zip(analysis.trials, _display_rows(analysis), strict=True):
        cls = ("missing" if not t.has_results else
               "significant" if t.p_holm is not None and t.p_holm <= ALPHA else "")
        tds = "".join(f"<td>{e(c)}</td>" for c in cells)
        body.append(f'<tr class="{cls}" data-trial="{e(t.id)}">{tds}</tr>')
    missing = ""
    if analysis.missing:
        items = "".join(f"<li>{e(m.describe())}</li>" for m in analysis.missing)
        missing = f'<h2>Trials without results</h2><ul id="missing">{items}</ul>'
    summary = "".join(f"<p>{e(line)}</p>" for line in [*_summary_lines(analysis),
                                                          *_method_lines(analysis)])
    metric_headers, metric_rows = scorer_metric_table(analysis)
    scorer_metrics = ""
    if metric_rows:
        head = "".join(f"<th>{e(h)}</th>" for h in metric_headers)
        cells = "".join(f'<tr data-trial="{e(row[0])}">'
                        + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                        for row in metric_rows)
        scorer_metrics = (f"<h2>Every scorer's metrics</h2><p>{e(SCORER_METRICS_NOTE)}</p>"
                          f'<table id="scorer-metrics"><thead><tr>{head}</tr></thead>'
                          f"<tbody>{cells}</tbody></table>")
    if arms := arm_rows(analysis):
        head = "".join(f"<th>{e(h)}</th>" for h in ARM_HEADERS)
        cells = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                        for row in arms)
        summary += (f'<h2>Prompt optimization vs fine-tuning</h2><table id="arms">'
                    f"<thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(analysis.experiment)}: results</title>
<style>{CSS}</style>
</head>
<body>
<h1>{e(analysis.experiment)}: results</h1>
{summary}
<table id="results"><thead><tr>{headers}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
{missing}
{scorer_metrics}
<h2>{e(analysis.metric.capitalize())} per trial</h2>
{metric_plot(analysis)}
<h2>Treatments vs their controls</h2>
{diff_plot(analysis)}
<h2>Fine-tuning loss</h2>
{loss_plot(analysis)}
{compute_html(analysis)}
<h2>Methods</h2>
<p>{e(METHODS)}</p>
</body>
</html>
"""
