"""A stage attempt's log in its Prefect task run: the bounded excerpt of cruijff.log_tail
(the last lines, and earlier error lines), one Prefect log entry per line, so the task run's
log pane says how the attempt went. Only a view: nothing here ever fails the stage. The
lines are for the Prefect UI, not the terminal, where `cruijff run` prints its own summary of a
failure (flows/console.py drops records marked STAGE_LOG from the console)."""

from __future__ import annotations

import logging
from pathlib import Path

from cruijff.flows.console import STAGE_LOG
from prefect import get_run_logger

from cruijff.log_tail import ERROR_LINE, excerpt
from cruijff.state import StageRecord, read_record

MARKED = {"extra": {STAGE_LOG: True}}


def show_attempt_log(trial_dir: Path, record: StageRecord | None) -> None:
    """Log the excerpt of `record`'s attempt log into the current task run: INFO lines, and
    on a failed attempt its error-looking lines as ERROR (the UI's level filter finds them).
    Outside a run, or with no log to read, nothing happens."""
    if record is None or not record.log:
        return
    try:
        logger = get_run_logger()
    except Exception:  # no run context (called outside a task run): nothing to log to
        return
    try:
        shown = excerpt(trial_dir / record.log)
        if shown is None:
            logger.warning("no log to show: %s cannot be read", record.log)
            return
        failed = record.status not in ("done", "running")
        logger.log(logging.ERROR if failed else logging.INFO, "%s %s; %s", record.stage,
                   record.status, shown.header(record.log), **MARKED)
        for line in shown.lines:
            level = logging.ERROR if failed and ERROR_LINE.search(line) else logging.INFO
            logger.log(level, "%s", line, **MARKED)
    except Exception as exc:  # a view: a log it cannot show is said, never raised
        logger.warning("the log of %s could not be shown: %s", record.stage,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def show_latest_log(trial_dir: Path, stage: str, before: StageRecord | None) -> None:
    """After an attempt that raised before returning its record: show the log of the record
    it left, if it started one (a run id other than `before`'s)."""
    try:
        record = read_record(trial_dir, stage)
    except Exception:  # an unreadable record: the stage's own error says why
        return
    if record is not None and (before is None or record.run_id != before.run_id):
        show_attempt_log(trial_dir, record)
