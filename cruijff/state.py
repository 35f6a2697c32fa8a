"""Stage records on disk, and stage keys.

Completion lives on disk: a stage is done when `<trial>/.cruijff/<stage>.json` says so with a
key equal to the stage's current key. Records are written atomically, and "done" only after
the outputs were verified, so a crash at any moment leaves either the old record or the new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

from cruijff.fileio import atomic_write_text
from cruijff.registry import file_stem

RECORDS = ".cruijff"
Status = Literal["running", "done", "failed", "reused", "interrupted"]
Outcome = Literal["OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "CANCELLED"]
"""Why Slurm ended an attempt, where that is more than "failed" (read from sacct)."""
FailureClass = Literal["deterministic", "transient"]
"""Would a failed attempt fail again? deterministic: the task or the config is wrong (an
import error, a missing split or file, bad task arguments): not retried. transient: killed,
out of memory or time, a lost node or network, anything unknown: retried."""


@dataclass
class GpuUse:
    """One device an attempt could use, and the most memory it held on it."""

    device: str
    """NVML UUID, else the CUDA index."""
    name: str | None = None
    total_mib: int | None = None
    peak_used_mib: int | None = None
    """NVML's device memory used, the most of all samples (every process on the device)."""
    torch_peak_allocated_mib: int | None = None
    torch_peak_reserved_mib: int | None = None
    """The recipe's own figures (torchtune logs them), where the stage reports them."""

    __pydantic_config__ = ConfigDict(extra="forbid")


@dataclass
class Usage:
    """What one attempt used, measured from outside by `python -m cruijff.usage` (the stage's
    whole process tree), plus what the stage says it got through."""

    wall_s: float
    cpu_s: float | None = None
    """User + system CPU of the whole tree (getrusage of the launcher's children)."""
    peak_rss_mib: float | None = None
    """The most, over the samples, of the summed resident memory of the tree (or the largest
    single process, if that is more: a stage shorter than one sample interval)."""
    largest_process_rss_mib: float | None = None
    max_processes: int | None = None
    samples: int = 0
    sampler_cpu_s: float | None = None
    """What measuring cost (the launcher's own CPU): kept to show it stays < 1 %."""
    gpus: list[GpuUse] = field(default_factory=list)
    throughput: dict[str, float] = field(default_factory=dict)
    """tokens_per_s, training_tokens, train_s (fine-tunes); samples, samples_per_s, eval_s
    (evals): what the stage reports of its own work."""
    size: dict[str, float] = field(default_factory=dict)
    """What the work's size was (epochs, train_examples, eval_samples, parameters): what
    `cruijff resources` scales a suggestion by."""
    final: bool = True
    """False: the last snapshot of an attempt killed before it could write its totals."""

    __pydantic_config__ = ConfigDict(extra="forbid")


@dataclass
class SlurmAccounting:
    """The scheduler's own view of an attempt (sacct), and what its job asked for."""

    job_id: str
    step_id: str | None = None
    """The srun step the attempt ran as; None: only the whole job's figures are known."""
    step_name: str | None = None
    requested: dict[str, Any] = field(default_factory=dict)
    """mem_mib, time_s, cpus, gpus: the profile the attempt's job asked for."""
    state: str | None = None
    """sacct State's first word: COMPLETED, FAILED, OUT_OF_MEMORY, TIMEOUT, CANCELLED, ..."""
    job_state: str | None = None
    """The worker job's State when asked (RUNNING while it runs further attempts)."""
    exit_code: str | None = None
    elapsed_s: float | None = None
    total_cpu_s: float | None = None
    max_rss_mib: float | None = None
    alloc_tres: str | None = None
    source: Literal["sacct", "sacct -c", "none"] = "none"
    note: str | None = None
    """Why a figure is missing: "no MaxRSS without jobacct_gather", "not yet in sacct"."""

    __pydantic_config__ = ConfigDict(extra="forbid")


@dataclass
class StageRecord:
    stage: str
    key: str
    status: Status
    attempts: int = 1
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Changes on every execution: downstream keys include it, so a re-run invalidates them."""
    started: str = field(default_factory=lambda: now())
    finished: str | None = None
    duration_s: float | None = None
    outputs: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    log: str | None = None
    error: str | None = None
    where: str | None = None
    """Where it ran: 'local:<host>:<pid>' or 'slurm:<job id>'."""
    reused_from: str | None = None
    """For a shared stage: the trial whose execution this one reuses."""
    environment: dict[str, str] = field(default_factory=dict)
    """What the stage ran with: Slurm job id, GPUs, memory, threads (see STAGE_ENVIRONMENT)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Earlier attempts with the same key: attempt, status, where, error."""
    fingerprint: dict[str, int] = field(default_factory=dict)
    """Size of every file of the verified outputs: a file truncated or lost after the stage
    was recorded done (a crash, a full disk, a hand) makes the stage not done any more."""
    usage: Usage | None = None
    """What this attempt used (None: reused, or not measured)."""
    slurm: SlurmAccounting | None = None
    outcome: Outcome | None = None
    grown: dict[str, Any] | None = None
    """What grow_on_oom asked for on this attempt beyond its profile ({"mem": 4, ...})."""
    failure: FailureClass | None = None
    """Of a failed attempt: whether a retry could help (None: done, or recorded before
    cruijff classified failures, which then counts as transient)."""
    failure_reason: str | None = None
    """The one line the class was judged on (the stage's error, or how it was killed)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # see _RECORD

    @property
    def is_done(self) -> bool:
        return self.status in ("done", "reused")

    @property
    def deterministic(self) -> bool:
        """Failed in a way every retry would repeat: the retry loop stops here."""
        return self.status == "failed" and self.failure == "deterministic"


def output_fingerprint(trial_dir: Path, outputs: list[str]) -> dict[str, int]:
    """Each file under the outputs (files or folders, relative to the trial) and its size."""
    sizes = {}
    for output in outputs:
        path = trial_dir / output
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            sizes[str(file.relative_to(trial_dir))] = file.stat().st_size
    return sizes


def damaged_output(trial_dir: Path, record: StageRecord) -> str | None:
    """The first output file that is gone or changed size since the record was written."""
    for relative, size in record.fingerprint.items():
        try:
            if (trial_dir / relative).stat().st_size != size:
                return f"{relative} changed size since it was verified"
        except OSError:
            return f"{relative} is missing"
    return None


def now() -> str:
    """UTC to the millisecond: a record's start and end then show the gaps between stages
    (benchmarks/overhead.py). Old records to the second still compare in the right order as
    strings ('+' sorts before '.')."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def record_path(trial_dir: Path, stage: str) -> Path:
    return trial_dir / RECORDS / f"{file_stem(stage)}.json"


def stage_lock_path(trial_dir: Path, stage: str) -> Path:
    """The lock a stage run by hand (cruijff/by_hand.py) holds while it runs."""
    return trial_dir / RECORDS / f"{file_stem(stage)}.lock"


def runs_by_hand(trial_dir: Path, stage: str) -> bool:
    """A stage run by hand holds its lock now: its record says 'running' and it is."""
    path = stage_lock_path(trial_dir, stage)
    try:
        with path.open("rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:  # no lock file: never run by hand
        return False
    return False


def read_record(trial_dir: Path, stage: str) -> StageRecord | None:
    """The stage's record, or None if there is none (or it is unreadable: then it is not done,
    and record_problem says why)."""
    return _load_record(trial_dir, stage)[0]


def record_problem(trial_dir: Path, stage: str) -> str | None:
    """Why the stage's record is there but unreadable (truncated, not JSON, a field of the
    wrong type), as views show it; None when it is readable or there is none."""
    problem = _load_record(trial_dir, stage)[1]
    if problem is None:
        return None
    relative = record_path(trial_dir, stage).relative_to(trial_dir)
    return f"its record {relative} is unreadable ({problem}): `cruijff run` runs it again"


def _load_record(trial_dir: Path, stage: str) -> tuple[StageRecord | None, str | None]:
    """(the record, None), (None, why it is unreadable), or (None, None) if there is none."""
    path = record_path(trial_dir, stage)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        return None, getattr(exc, "strerror", None) or str(exc)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, f"not JSON: {exc}"
    return _validated(data)


_RECORD = TypeAdapter(StageRecord)
"""Checks a record's JSON against StageRecord's own fields and types: an edited record must
not break a view that reads it (a field added to StageRecord is checked too)."""


def _validated(data: Any) -> tuple[StageRecord | None, str | None]:
    """(the record, None), or (None, what in its JSON StageRecord cannot hold: a missing,
    unknown or wrong-typed field)."""
    try:
        record = _RECORD.validate_python(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        return None, f"field {where!r}: {error['msg']}" if where else error["msg"]
    if any(not isinstance(h.get("where"), str | None) for h in record.history):
        return None, "field 'history': an attempt's 'where' is not a string"
    return record, None


def write_record(trial_dir: Path, record: StageRecord) -> None:
    atomic_write_text(record_path(trial_dir, record.stage), json.dumps(asdict(record), indent=2))


def digest(material: Any) -> str:
    """A stable hash of JSON-able material."""
    text = json.dumps(material, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


STAGE_ENVIRONMENT = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURMD_NODENAME", "SLURM_MEM_PER_NODE",
                     "SLURM_CPUS_PER_TASK", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES",
                     "OMP_NUM_THREADS")


def where_now() -> str:
    """'slurm:<job id>' inside a Slurm job, else 'local:<host>:<pid>'."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm:{job}" if job else f"local:{os.uname().nodename}:{os.getpid()}"
