"""After a Slurm attempt of a stage ends: what its job asked for, the scheduler's own view
of it (sacct), why Slurm ended it where that is more than "failed" (OUT_OF_MEMORY, TIMEOUT),
and what its retry asks for when `orchestration.grow_on_oom` says so. And, for any attempt,
whether its failure would repeat (failure_class): `cruijff exec` reports that for the error
its stage raised (report_failure), and the retry loop retries only transient failures.

The worker that ran the attempt writes its record; this side (the run, on the login node)
adds what only the scheduler knows, once the attempt is over, so the retry loop can decide
on it. A local attempt has none of this: nothing was asked, nothing grows.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import suppress
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cruijff import sacct
from cruijff.errors import CruijffError
from cruijff.fileio import atomic_write_text, load_yaml_mapping
from cruijff.runner import FAILURE_REPORT, STOP, Trial, log_tail, read_usage
from cruijff.settings import (
    GrowPolicy,
    ResourceProfile,
    describe_validation_error,
    gpu_count,
    slurm_seconds,
)
from cruijff.state import FailureClass, StageRecord, now, read_record, write_record

FAILED_WAIT_S = 20.0
"""How long a failed attempt waits for sacct to show its step ended (the retry depends on
why it ended); a done attempt asks once, and the run's end asks again for what was late."""


def trial_profile(trial: Trial) -> ResourceProfile:
    """The profile a trial's worker jobs ask for (the build writes it as `resources`: the
    most its stages' own profiles ask for)."""
    config = trial.dir / "config.yaml"
    data = load_yaml_mapping(config, f"trial {trial.id} config")
    try:  # an edited trial config gets the checks the experiment config got at build
        return ResourceProfile(**data.get("resources", {}))
    except (ValidationError, TypeError) as exc:
        why = (describe_validation_error(exc, ResourceProfile).removeprefix(": ")
               if isinstance(exc, ValidationError) else "must be a mapping")
        raise CruijffError(f"{config}: resources: {why}") from None


def asked(profile: ResourceProfile) -> dict[str, Any]:
    """What a profile asks Slurm for, in the units records use: mem_mib, time_s, cpus, gpus."""
    values = profile.requests()
    figures: dict[str, Any] = {}
    if "mem" in values:
        figures["mem_mib"] = int(values["mem"]) * 1024
    if "time" in values:
        figures["time_s"] = slurm_seconds(values["time"])
    if "cpus_per_task" in values:
        figures["cpus"] = int(values["cpus_per_task"])
    if "gres" in values and (gpus := gpu_count(values["gres"])):
        figures["gpus"] = gpus
    return figures


def peak_mib(record: StageRecord) -> float | None:
    """The most memory an attempt was seen to hold: the launcher's tree or sacct's MaxRSS."""
    figures = [record.usage.peak_rss_mib if record.usage else None,
               record.slurm.max_rss_mib if record.slurm else None]
    known = [f for f in figures if f is not None]
    return max(known) if known else None


def settle(trial: Trial, stage: str, *, wait_s: float,
           grown: dict[str, Any] | None = None) -> StageRecord | None:
    """Add the scheduler's view to the stage's newest record, if it ran in a Slurm job: sacct's
    figures for its step, what its job asked for, and, for a failed attempt (or one whose
    worker was lost with it: still `running`), why Slurm ended it. Returns the record."""
    record = read_record(trial.dir, stage)
    if record is None or not (record.where or "").startswith("slurm:"):
        return record
    profile = trial_profile(trial)
    if grown:
        profile = profile.model_copy(update=grown)
    step_name = record.slurm.step_name if record.slurm else None
    ended = record.status in ("failed", "running")
    view = sacct.step_accounting(record.where.split(":", 1)[1], None, step_name,
                                 requested=asked(profile), wait_s=wait_s if ended else 0.0)
    record.slurm = view
    if ended:
        log = trial.dir / record.log if record.log else None
        record.outcome = sacct.classify(view, log_tail(log, 40) if log else "")
        if record.status == "running" and not STOP.is_set():
            # the worker died with the attempt (an OOM or TIMEOUT of the whole job)
            record.status, record.finished = "failed", now()
            record.usage = record.usage or read_usage(trial, stage, {})
            record.error = "its Slurm worker job ended while it ran"
            record.failure, record.failure_reason = "transient", record.error
        if record.outcome and record.status == "failed":
            if record.deterministic:  # Slurm ended it: whatever the stage raised, retry
                record.error = (record.error or "").split("\n", 1)[-1]
            record.failure, record.failure_reason = "transient", describe(record)
            record.error = f"{describe(record)}\n{record.error or ''}".rstrip()
    write_record(trial.dir, record)
    return record


def describe(record: StageRecord) -> str:
    """`OUT_OF_MEMORY at 2.1/2G (sacct: step 41.3)`: the outcome with the figure it reached."""
    asked_now = record.slurm.requested if record.slurm else {}
    if record.outcome == "OUT_OF_MEMORY":
        peak = peak_mib(record)
        reached = f"{peak / 1024:.1f}" if peak is not None else "?"
        limit = asked_now.get("mem_mib")
        figure = f" at {reached}/{limit / 1024:g}G" if limit else f" at {reached}G"
    elif record.outcome == "TIMEOUT":
        used = record.usage.wall_s if record.usage else None
        limit = asked_now.get("time_s")
        figure = (f" after {used / 60:.1f} min" if used is not None else "") + (
            f" of {limit / 60:g} min" if limit else "")
    else:
        figure = ""
    step = (f" (sacct: step {record.slurm.job_id}.{record.slurm.step_id})"
            if record.slurm and record.slurm.step_id else "")
    return f"{record.outcome}{figure}{step}"


def grow(record: StageRecord | None, policy: GrowPolicy | None,
         current: dict[str, Any] | None, trial: Trial) -> tuple[dict[str, Any] | None, str]:
    """What the retry of an attempt that ran out of memory asks for beyond the trial's
    profile ({"mem": GB}), and one line saying so; (current, "") when nothing grows."""
    if policy is None or record is None or record.outcome != "OUT_OF_MEMORY":
        return current, ""
    before = (current or {}).get("mem") or trial_profile(trial).requests().get("mem")
    if before is None:
        return current, (f"trial {trial.id} {record.stage} {describe(record)}; not grown: "
                         "its profile asks for no memory (set resources mem)")
    wanted = min(math.ceil(before * policy.factor), policy.max_mem)
    if wanted <= before:
        return current, (f"trial {trial.id} {record.stage} {describe(record)}; not grown: at "
                         f"the cap {policy.max_mem}G (grow_on_oom.max_mem)")
    return {**(current or {}), "mem": wanted}, (
        f"trial {trial.id} {record.stage} {describe(record)}; retrying with mem {wanted}G "
        f"(grow_on_oom ×{policy.factor:g}, cap {policy.max_mem}G)")


def settle_late(selection: list[tuple[Trial, list[str]]], wait_s: float = 10.0) -> None:
    """At the end of a run, once its worker jobs are gone: the attempts whose step sacct did
    not show as ended when they were settled get their final figures now."""
    for trial, stages in selection:
        for stage in stages:
            record = read_record(trial.dir, stage)
            if (record is not None and record.slurm is not None and record.reused_from is None
                    and record.slurm.state not in sacct.FINAL_STATES):
                settle(trial, stage, wait_s=wait_s, grown=record.grown)


DETERMINISTIC = (CruijffError, ImportError, SyntaxError, TypeError, FileNotFoundError,
                 NotADirectoryError, IsADirectoryError)
"""Errors of the task or the config: the same inputs raise them again (an eval.py that
cannot import, a task function given bad arguments, a file the config names missing)."""
DETERMINISTIC_NAMES = frozenset({"DatasetGenerationError", "DatasetNotFoundError",
                                 "SplitsNotFoundError", "EmptyDatasetError"})
"""The same, by class name, from libraries cruijff does not import (Hugging Face datasets)."""
TRANSIENT = (ConnectionError, TimeoutError, MemoryError, InterruptedError)
TRANSIENT_NAMES = frozenset({"OutOfMemoryError", "HTTPError", "HfHubHTTPError", "ConnectError",
                             "ConnectTimeout", "ReadTimeout", "RemoteProtocolError",
                             "RemoteDisconnected", "ProtocolError", "DistNetworkError",
                             "DistBackendError", "RateLimitError", "APIConnectionError",
                             "APITimeoutError"})
"""Whatever a retry may not meet again: memory, the network, a peer process. They win over
DETERMINISTIC anywhere in an error's chain (a task function that failed to download its
data is reported as a CruijffError wrapping the ConnectionError)."""
MISSING_SPLIT = re.compile(r"\b(unknown|bad|missing|no) split\b", re.IGNORECASE)


def _chain(error: BaseException) -> list[BaseException]:
    """The error and those it was raised from or while handling (even `from None`'s)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def failure_class(error: BaseException) -> tuple[FailureClass, str]:
    """Would a stage that raised `error` fail the same way on a retry? (class, one line).
    Anything not known to be the task's or the config's fault counts as transient."""
    first = (str(error).splitlines() or [""])[0]
    reason = first if isinstance(error, CruijffError) and first else \
        f"{type(error).__name__}: {first}".rstrip(": ")
    chain = _chain(error)
    if any(isinstance(e, TRANSIENT) or type(e).__name__ in TRANSIENT_NAMES for e in chain):
        return "transient", reason
    if any(isinstance(e, DETERMINISTIC) or type(e).__name__ in DETERMINISTIC_NAMES
           or getattr(e, "deterministic", False)
           or (isinstance(e, ValueError) and MISSING_SPLIT.search(str(e))) for e in chain):
        return "deterministic", reason
    return "transient", reason


def report_failure(error: BaseException) -> None:
    """In `cruijff exec`, as its stage raises: write the failure's class where the runner
    reads it (FAILURE_REPORT). A report that cannot be written leaves the failure transient:
    reporting never changes how the stage itself ends."""
    path = os.environ.get(FAILURE_REPORT)
    if not path:
        return
    kind, reason = failure_class(error)
    with suppress(OSError):
        atomic_write_text(Path(path), json.dumps({"class": kind, "reason": reason[:500]}))
