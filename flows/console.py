"""Prefect's console output, kept to what a researcher needs while cruijff runs flows: cruijff
prints its own one line for its errors and for a lost server; the Prefect UI keeps the full
record."""

from __future__ import annotations

import logging
import os

from cruijff.errors import CruijffError


def quiet_console() -> None:
    """Before Prefect is imported: its console handlers at WARNING, its internal logger quiet
    (its background services log each event they could not send while its server is away);
    after: the filter below on its handlers."""
    for handler in ("CONSOLE", "CONSOLE_FLOW_RUNS", "CONSOLE_TASK_RUNS"):
        os.environ.setdefault(f"PREFECT_LOGGING_HANDLERS_{handler}_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_INTERNAL_LOGGING_LEVEL", "CRITICAL")


STAGE_LOG = "cruijff_stage_log"
"""The attribute that marks a log record as a line of a stage's own log (flows/stage_logs.py)."""

_NOISY_WITHOUT_SERVER = ("prefect.events.clients", "EventsWorker", "APILogWorker")
"""Without its server, Prefect's event client warns about every reconnect and its queue
services (loggers named by class) that items are still waiting at exit."""


def without_cruijff_errors() -> None:
    """Prefect logs an exception that ends a flow with its traceback; for a CruijffError (e.g.
    no Slurm job can be submitted) the CLI prints the one line itself, so Prefect's console
    handlers drop it, and the lines of a stage's own log shown in its task run
    (flows/stage_logs.py: for the UI; the CLI summarizes a failure itself)."""
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs", *_NOISY_WITHOUT_SERVER):
        for handler in logging.getLogger(name).handlers:  # "": the root
            if isinstance(handler, logging.StreamHandler) and _not_cruijff_error not in \
                    handler.filters:
                handler.addFilter(_not_cruijff_error)
    logging.raiseExceptions = False  # Prefect's API log handler writes its failures to stderr


def _not_cruijff_error(record: logging.LogRecord) -> bool:
    """Drop errors the CLI reports itself: cruijff's, a lost Prefect server, and a stage log's
    lines."""
    if getattr(record, STAGE_LOG, False):
        return False
    if record.name.startswith(_NOISY_WITHOUT_SERVER) and record.levelno < logging.CRITICAL:
        return False
    if not record.exc_info or record.exc_info[1] is None:
        return True
    return not (isinstance(record.exc_info[1], CruijffError) or server_lost(record.exc_info[1]))


def server_lost(exc: BaseException) -> bool:
    """The Prefect API stopped answering (after the client's own retries)."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(exc, PrefectHTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)
