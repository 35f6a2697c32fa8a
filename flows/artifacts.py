"""What an experiment run came to, as Prefect artifacts on its flow run: a table (one row per
trial: treatment, state, the headline metric with its confidence interval, the final loss,
the attempts) and a markdown note naming the report. Read from the core's own summary
(cruijff.summary), so the Prefect UI says what `cruijff summary` says. Only a view: a failure
here is logged as a warning and never fails the run."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cruijff.experiment import REPORT_DIR
from cruijff.registry import STAGES
from cruijff.runner import DONE_STATES, Experiment, select
from cruijff.state import read_record
from cruijff.summary import StageStatus, TrialStatus, summarize

CONFIDENCE = 0.95
ERROR_WIDTH = 200


def experiment_key(experiment: str, suffix: str = "") -> str:
    """`cruijff-<experiment>[-suffix]` as Prefect keys must be: lowercase letters, digits and
    dashes (each run of the experiment is a new version of the same artifact)."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{experiment}-{suffix}".lower()).strip("-")
    return f"cruijff-{slug[:150]}"


def _trial_state(trial: TrialStatus) -> str:
    """`done`, or the first stage that is not done with its state: `failed (eval)`."""
    for stage, status in trial.stages.items():
        if status.state not in DONE_STATES:
            return f"{status.state} ({stage})"
    return "done"


def _interval(trial_dir: Path, stage: str, headline: str, value: Any) -> str:
    """The confidence interval of the headline as the report computes it (cruijff.analysis:
    Wilson for 0/1 scores, else a bootstrap, over the per-sample means across epochs), read
    from the eval's Inspect log; '-' where the headline is not that mean (another metric) or
    the log has no per-sample scores of its scorer."""
    from cruijff.analysis import mean_estimate
    from cruijff.log_scores import read_scores

    record = read_record(trial_dir, stage)
    if record is None or not record.outputs or not isinstance(value, int | float):
        return "-"
    scores = read_scores(trial_dir / record.outputs[0])
    scorer = headline.rpartition("/")[0] or headline
    name = scores.scorers.get(scorer, scorer)
    by_sample: dict[str, list[float]] = defaultdict(list)
    for row in scores.rows:
        if row["scorer"] == name:
            by_sample[row["sample_id"]].append(row["score"])
    if not by_sample:
        return "-"
    estimate = mean_estimate([sum(v) / len(v) for v in by_sample.values()], CONFIDENCE)
    if not math.isclose(estimate.value, float(value), abs_tol=1e-9) or math.isnan(estimate.low):
        return "-"
    return f"[{estimate.low:.3f}, {estimate.high:.3f}]"


def _headline_cells(trial_dir: Path, stage: str, status: StageStatus) -> dict[str, str]:
    """The stage's headline columns (cruijff.stages.Headline): a metric the user picks gives
    `metric`, `value` and its interval; a fixed one (final loss) its own column."""
    cells: dict[str, str] = {}
    metrics = status.metrics
    for headline in STAGES[stage].headlines:
        value = metrics.get(headline.metric)
        shown = format(value, headline.format) if isinstance(value, int | float) else "-"
        if headline.named_by is None:
            cells[headline.column] = shown
            continue
        name = metrics.get(headline.named_by)
        if name is None and headline.fallback in metrics:  # a record from before eval.metric
            name, value = headline.fallback, metrics[headline.fallback]
            shown = format(value, headline.format) if isinstance(value, int | float) else "-"
        cells["metric"] = str(name) if name is not None else "-"
        cells["value"] = shown
        ci = f"{CONFIDENCE:.0%} CI"
        cells[ci] = "-"
        if name is not None and status.state in DONE_STATES and STAGES[stage].scores:
            try:
                cells[ci] = _interval(trial_dir, stage, str(name), value)
            except Exception:  # an unreadable log: the value stands, without an interval
                cells[ci] = "-"
    return cells


def trial_rows(experiment: Experiment) -> list[dict[str, str]]:
    """One row per trial of the experiment, from cruijff.summary: every column in every row."""
    summary = summarize(experiment, select(experiment))
    rows: list[dict[str, str]] = []
    for trial in summary.trials:
        row = {"trial": trial.id, "treatment": trial.label, "state": _trial_state(trial)}
        trial_dir = experiment.trial(trial.id).dir
        # The outcome first (the eval's headline), then how it came about (the final loss).
        for stage in reversed(list(trial.stages)):
            if stage in STAGES:
                row.update(_headline_cells(trial_dir, stage, trial.stages[stage]))
        row["attempts"] = ", ".join(f"{stage} {status.attempts}"
                                    for stage, status in trial.stages.items()
                                    if status.attempts)
        errors = [f"{stage}: {status.error.strip().splitlines()[-1]}"
                  for stage, status in trial.stages.items()
                  if status.state in ("failed", "interrupted") and status.error
                  and status.error.strip()]
        row["error"] = "; ".join(errors)[:ERROR_WIDTH]
        rows.append(row)
    columns = list(dict.fromkeys(c for row in rows for c in row))
    return [{c: row.get(c, "-") for c in columns} for row in rows]


def report_markdown(experiment: Experiment, rows: list[dict[str, str]]) -> str:
    """Where the report is (if `cruijff analyze` made one) or the command that makes it."""
    done = sum(row["state"] == "done" for row in rows)
    lines = [f"# {experiment.name}", ""]
    if rows:
        lines += [f"{done} of {len(rows)} trials done. Trials, metrics and losses: the "
                  f"`{experiment_key(experiment.name)}` table artifact; each stage attempt's "
                  "log: its task run.", ""]
    report = experiment.path / REPORT_DIR / "report.html"
    command = f"cruijff analyze {experiment.path}"
    if report.is_file():
        lines += [f"Report: [{report}]({report.as_uri()}) (with report.md and results.csv "
                  "beside it).", "",
                  f"It was made by an earlier `analyze`; `{command}` writes it again with "
                  "this run's results."]
    else:
        lines += ["No report yet. Make it (comparisons against controls with confidence "
                  "intervals, plots) with:", "", f"    {command}"]
    return "\n".join(lines) + "\n"


def publish(experiment: Experiment) -> None:
    """The run's table and report note, as artifacts of the current flow run. Never raises:
    what goes wrong (a busy server's HTTP 503, an unreadable record) is one warning."""
    try:
        logger = get_run_logger()
    except Exception:  # no run context: nothing to publish to
        return
    def publish_one(what: str, create: Any) -> None:
        try:
            create()
        except Exception as exc:
            logger.warning("no %s artifact for %s: %s", what, experiment.name,
                           str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    rows: list[dict[str, str]] = []

    def table() -> None:
        rows[:] = trial_rows(experiment)
        create_table_artifact(rows, key=experiment_key(experiment.name),
                              description=f"{experiment.name}: every trial after this run "
                              "(as `cruijff summary` shows it)")

    publish_one("results", table)
    publish_one("report", lambda: create_markdown_artifact(
        report_markdown(experiment, rows), key=experiment_key(experiment.name, "report"),
        description=f"{experiment.name}: the report"))
