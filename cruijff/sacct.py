"""Slurm's own account of a stage attempt (sacct), and the srun step an attempt runs as.

A worker job runs many stages in a row, so its own sacct line mixes them; each attempt runs as
a job step of its own (`step_prefix`), whose sacct line has that attempt's State, MaxRSS,
TotalCPU and Elapsed, and an attempt over its memory kills only its step, not the worker.
Reading sacct never fails an attempt: every problem becomes a `note` on the record.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cruijff.errors import CruijffError
from cruijff.state import Outcome, SlurmAccounting

FIELDS = ("JobID", "JobName", "State", "ExitCode", "Elapsed", "TotalCPU", "MaxRSS",
          "AllocTRES", "Timelimit")
COMPLETION_FIELDS = ("JobID", "JobName", "State", "ExitCode", "Elapsed", "Timelimit", "NCPUS")
"""What the job completion log (`sacct -c`, jobcomp/filetxt) has: jobs only, no steps, no
memory. Its Timelimit is in minutes; asking it for AllocTRES makes sacct 22.05 crash."""

FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "REVOKED"})
"""States after which sacct's figures of a job or step no longer change."""

STEP_NAME = re.compile(r"[A-Za-z0-9:._-]{1,200}")
"""What a step name may hold: it is an srun argument and a sacct JobName, matched whole."""

MEMORY_LOG = re.compile(r"exceeded memory limit|oom-kill|exceeded job memory", re.IGNORECASE)
"""What Slurm writes into a step's output when it kills the step for its memory
(jobacct_gather's OverMemoryKill; the cgroup OOM killer)."""
TIME_LOG = re.compile(r"DUE TO TIME LIMIT")
"""slurmstepd's `*** STEP 41.3 ON node CANCELLED AT ... DUE TO TIME LIMIT ***`."""

SACCT_TIMEOUT_S = 20.0
OTHERS = "its figures are another attempt's"
_DURATION = re.compile(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)")
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)([KMGTP]?)", re.IGNORECASE)
_MIB_PER = {"": 1 / 1024 ** 2, "K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 ** 2,
            "P": 1024.0 ** 3}


# ---------------------------------------------------------------- parsers


def parse_duration(text: str) -> float | None:
    """Seconds of a sacct duration: Elapsed and Timelimit `[D-]HH:MM:SS`, TotalCPU
    `[D-][HH:]MM:SS[.mmm]`; None for blank, UNLIMITED, Partition_Limit and the like."""
    found = _DURATION.fullmatch(text.strip())
    if found is None:
        return None
    days, hours, minutes, seconds = found.groups()
    return round(int(days or 0) * 86400 + int(hours or 0) * 3600 + int(minutes) * 60
                 + float(seconds), 3)


parse_elapsed = parse_duration
parse_total_cpu = parse_duration


def parse_memory_mib(text: str) -> float | None:
    """MiB of a sacct memory figure (`123K`, `4.5M`, `2G`; Slurm's units are powers of 1024,
    a bare number is bytes); None when blank."""
    found = _MEMORY.fullmatch(text.strip())
    if found is None:
        return None
    number, unit = found.groups()
    return round(float(number) * _MIB_PER[unit.upper()], 3)


def parse_tres(text: str) -> dict[str, str]:
    """`billing=2,cpu=2,gres/gpu=1,mem=1G,node=1` as a mapping (empty for blank)."""
    pairs = (item.partition("=") for item in text.strip().split(",") if "=" in item)
    return {key.strip(): value.strip() for key, _, value in pairs if key.strip()}


def tres_request(tres: str, timelimit: str = "") -> dict[str, Any]:
    """The request a job or step line shows: mem_mib, cpus, gpus (from AllocTRES) and
    time_s (from Timelimit), where given."""
    values = parse_tres(tres)
    request: dict[str, Any] = {}
    if (mem := parse_memory_mib(values.get("mem", ""))) is not None:
        request["mem_mib"] = int(mem) if mem.is_integer() else mem
    for key, name in (("cpu", "cpus"), ("gres/gpu", "gpus")):
        if values.get(key, "").isdigit():
            request[name] = int(values[key])
    if (limit := parse_duration(timelimit)) is not None:
        request["time_s"] = int(limit) if limit.is_integer() else limit
    return request


def state_word(text: str) -> str | None:
    """State's first word: `CANCELLED by 0` -> CANCELLED (None when blank)."""
    words = text.split()
    return words[0].rstrip("+") if words else None


@dataclass(frozen=True)
class Line:
    """One line of `sacct -P` output, by field name."""

    fields: dict[str, str]

    def __getitem__(self, name: str) -> str:
        return self.fields.get(name, "")


def parse_lines(text: str, fields: tuple[str, ...] = FIELDS) -> list[Line]:
    """The lines of `sacct -n -P -o <fields>` output (lines of another shape are left out)."""
    lines = []
    for raw in text.splitlines():
        parts = raw.split("|")
        if len(parts) == len(fields) and parts[0].strip():
            lines.append(Line({name: part.strip() for name, part in zip(fields, parts,
                                                                        strict=True)}))
    return lines


# ---------------------------------------------------------------- reading sacct


@dataclass(frozen=True)
class _Answer:
    text: str
    problem: str | None  # why there is no answer: sacct failed, timed out, is not here


def _sacct(args: list[str]) -> _Answer:
    try:
        proc = subprocess.run(["sacct", *args], capture_output=True, text=True,
                              timeout=SACCT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return _Answer("", f"sacct did not answer within {SACCT_TIMEOUT_S:g} s")
    except OSError as exc:
        return _Answer("", f"sacct could not run: {exc}")
    if proc.returncode != 0:
        said = " ".join((proc.stderr or proc.stdout).split())[:200]
        return _Answer("", f"sacct failed: {said or f'exit code {proc.returncode}'}")
    return _Answer(proc.stdout, None)


def _find_step(lines: list[Line], job_id: str, step_id: str | None,
               step_name: str | None) -> tuple[Line | None, str | None]:
    """The attempt's step line, or None and why. A step counts only under its own name; with
    no step id, the newest step of that name is the attempt's."""
    if step_id is not None:
        line = next((x for x in lines if x["JobID"] == f"{job_id}.{step_id}"), None)
        if line is None:
            return None, f"step {job_id}.{step_id} is not in sacct (yet)"
        if step_name is not None and line["JobName"] != step_name:
            return None, (f"step {job_id}.{step_id} is named {line['JobName']!r} in sacct, not "
                          f"{step_name!r}: {OTHERS}")
        return line, None
    named = [x for x in lines if x["JobID"].startswith(f"{job_id}.")
             and x["JobName"] == step_name and x["JobID"].split(".", 1)[1].isdigit()]
    if not named:
        return None, f"no step named {step_name!r} in job {job_id} in sacct (yet)"
    return max(named, key=lambda x: int(x["JobID"].split(".", 1)[1])), None


def _fill(record: SlurmAccounting, job: Line | None, step: Line | None, *,
          by_step: bool) -> None:
    """The record's figures from the step's line (or, not by step, the job's); the job's
    line adds its State and whatever of the request the caller did not know."""
    if job is not None:
        record.job_state = state_word(job["State"])
        for key, value in tres_request(job["AllocTRES"], job["Timelimit"]).items():
            record.requested.setdefault(key, value)
    source = step if by_step else job
    if source is None:
        return
    record.state = state_word(source["State"])
    record.exit_code = source["ExitCode"] or None
    record.elapsed_s = parse_duration(source["Elapsed"])
    record.alloc_tres = source["AllocTRES"] or None
    if step is not None:
        record.step_id = step["JobID"].split(".", 1)[1]
        record.total_cpu_s = parse_duration(step["TotalCPU"])
        record.max_rss_mib = parse_memory_mib(step["MaxRSS"])


def step_accounting(job_id: str, step_id: str | None, step_name: str | None, *,
                    requested: Mapping[str, Any] | None = None, wait_s: float = 0.0,
                    poll_s: float = 1.0) -> SlurmAccounting:
    """sacct's view of one attempt: its step `<job_id>.<step_id>` (or, with no step id, the
    newest step named `step_name`), asked every `poll_s` until the step's State is final or
    `wait_s` has passed. With neither a step id nor a name, the whole job's line (State,
    ExitCode, Elapsed; the job may have run other attempts too). Where slurmdbd is not
    there, the job completion log (`sacct -c`: the job, once it ended). Never raises for a
    sacct problem: the record's `note` says what is missing and why."""
    job_id = str(job_id).strip()
    record = SlurmAccounting(job_id=job_id, step_id=step_id, step_name=step_name,
                             requested=dict(requested or {}))
    if not job_id.isdigit():
        record.note = f"{job_id!r} is not a Slurm job id"
        return record
    if shutil.which("sacct") is None:
        record.note = "no sacct here"
        return record
    by_step = step_id is not None or step_name is not None
    ids = f"{job_id}.{step_id},{job_id}" if step_id is not None else job_id
    deadline = time.monotonic() + max(wait_s, 0.0)
    while True:
        answer = _sacct(["-n", "-P", "--noconvert", "-j", ids, "-o", ",".join(FIELDS)])
        if answer.problem is not None:
            return _completion_accounting(record, answer.problem, deadline, poll_s,
                                          by_step=by_step)
        lines = parse_lines(answer.text)
        job = next((x for x in lines if x["JobID"] == job_id), None)
        step, missing = _find_step(lines, job_id, step_id, step_name) if by_step else (None, None)
        _fill(record, job, step, by_step=by_step)
        record.source = "sacct" if job is not None or step is not None else "none"
        if not by_step and job is None:
            missing = f"job {job_id} is not in sacct (yet)"
        if missing is not None and missing.endswith(OTHERS):  # asking again changes nothing
            record.note = missing
            return record
        if missing is None and record.state in FINAL_STATES:
            record.note = None if by_step else (
                "the whole job's figures: it may have run other attempts too")
            return record
        if time.monotonic() >= deadline:
            record.note = missing or (
                f"{'step' if by_step else 'job'} still {record.state or 'unknown'} in sacct "
                f"after {wait_s:g} s")
            return record
        time.sleep(poll_s)


def _completion_accounting(record: SlurmAccounting, problem: str, deadline: float,
                           poll_s: float, *, by_step: bool) -> SlurmAccounting:
    """The job's line in the job completion log, written once the job ends: State, ExitCode,
    Elapsed, CPUs, time limit only (a worker job still running has none yet: not waited
    for). Asked for a step, only the job's State and request are kept: the job's figures are
    not the step's."""
    job_id = record.job_id
    while True:
        answer = _sacct(["-c", "-n", "-P", "-j", job_id, "-o", ",".join(COMPLETION_FIELDS)])
        if answer.problem is not None:
            record.source, record.note = "none", f"{problem}; {answer.problem}"
            return record
        ended = [x for x in parse_lines(answer.text, COMPLETION_FIELDS) if x["JobID"] == job_id]
        if ended:
            _fill_completed(record, ended[-1], by_step=by_step)
            record.source = "sacct -c"
            record.note = (f"job-level only, from the job completion log ({problem}): no "
                           "step, MaxRSS or TotalCPU")
            return record
        if _job_active(job_id) or time.monotonic() >= deadline:
            record.source = "none"
            record.note = (f"{problem}; job {job_id} has no line in the job completion log "
                           "(written when the job ends)")
            return record
        time.sleep(poll_s)


def _fill_completed(record: SlurmAccounting, job: Line, *, by_step: bool) -> None:
    record.job_state = state_word(job["State"])
    if job["NCPUS"].isdigit():
        record.requested.setdefault("cpus", int(job["NCPUS"]))
    limit = job["Timelimit"]
    seconds = int(limit) * 60 if limit.isdigit() else parse_duration(limit)
    if seconds is not None:
        record.requested.setdefault("time_s", seconds)
    if not by_step:  # the job's own figures are not a step's
        record.state = record.job_state
        record.exit_code = job["ExitCode"] or None
        record.elapsed_s = parse_duration(job["Elapsed"])


def _job_active(job_id: str) -> bool:
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                              text=True, timeout=SACCT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


# ---------------------------------------------------------------- outcome


def classify(accounting: SlurmAccounting | None, log_tail: str = "") -> Outcome | None:
    """Why Slurm ended a failed attempt, where that is more than "failed": the step's own
    State first, then what Slurm wrote into the stage's log (OverMemoryKill ends a step
    CANCELLED or FAILED), then the worker job's State (a job over its time limit ends its
    steps CANCELLED). None for a step that completed, or when nothing says more."""
    state = accounting.state if accounting is not None else None
    job_state = accounting.job_state if accounting is not None else None
    if state == "COMPLETED":
        return None
    if state in ("OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "PREEMPTED"):
        return state
    if state == "DEADLINE":
        return "TIMEOUT"
    if state not in (None, "CANCELLED", "FAILED"):
        return None
    if MEMORY_LOG.search(log_tail):
        return "OUT_OF_MEMORY"
    if TIME_LOG.search(log_tail):
        return "TIMEOUT"
    if state != "FAILED":
        if job_state in ("OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "PREEMPTED"):
            return job_state
        if job_state == "DEADLINE":
            return "TIMEOUT"
    return "CANCELLED" if state == "CANCELLED" else None


# ---------------------------------------------------------------- the step an attempt runs as


def step_name(*parts: object) -> str:
    """A step name from its parts (`cruijff:<experiment>:<trial>:<stage>:a<N>`), every
    character srun and sacct could misread replaced by `_`."""
    name = ":".join(re.sub(r"[^A-Za-z0-9._-]", "_", str(part)) for part in parts)
    return name[:200]


def step_prefix(name: str) -> list[str]:
    """The words that run a stage's command as its own job step inside the worker job
    (prepend them to the command), or [] outside a Slurm job, without srun, or unless
    CRUIJFF_STAGE_STEP=1. `--overlap`: the step shares the job's CPUs with any step still
    ending (without it, Slurm 22.05 holds a second step until the first is gone). The step
    gets the job's memory (srun reads SLURM_MEM_PER_NODE), which OverMemoryKill holds it to,
    and all the job's GPUs (CUDA_VISIBLE_DEVICES as the job's)."""
    if not STEP_NAME.fullmatch(name):
        raise CruijffError(f"step name {name!r} may hold only letters, digits and : . _ - "
                           "(at most 200)")
    if not os.environ.get("SLURM_JOB_ID") or os.environ.get("CRUIJFF_STAGE_STEP") != "1" \
            or shutil.which("srun") is None:
        return []
    words = ["srun", "--ntasks=1", "--nodes=1"]
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit():  # srun 22.05 does not read it from the job's environment
        words.append(f"--cpus-per-task={cpus}")
    return [*words, "--overlap", f"--job-name={name}", "--kill-on-bad-exit=1", "--quiet", "--"]
