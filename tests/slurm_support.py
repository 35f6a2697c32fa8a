"""Test support for the real single-node Slurm cluster (`bash scripts/slurm/start.sh`).

    from slurm_support import requires_slurm, sbatch, wait_for_job

    @requires_slurm
    def test_something(tmp_path):
        job = sbatch(["--wrap", "true"], cwd=tmp_path)
        assert wait_for_job(job).state == "COMPLETED"

`requires_slurm` skips when Slurm is not running here, unless `CRUIJFF_REQUIRE_SLURM=1` (set by
CI), in which case the test fails: a missing cluster can never pass silently. Fixtures that need
Slurm call `require_slurm()` themselves (a decorator only runs after the fixtures are set up).
"""

from __future__ import annotations

import functools
import inspect
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from service_support import require_service

START_HINT = "start it with: bash scripts/slurm/start.sh (as root)"
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}
# States in which a job is still queued or running (squeue's long names).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT",
                 "STOPPED", "RESV_DEL_HOLD"}

_submitted_at: dict[int, float] = {}
_unavailable: str | None = None  # remembered: with no controller, sinfo takes ~9 s to give up


def slurm_unavailable_reason() -> str | None:
    """None when a Slurm node here can take jobs, else why not (in words).

    A negative answer is remembered for the rest of the process; a positive one is re-checked.
    """
    global _unavailable
    if _unavailable is None:
        _unavailable = _check_slurm()
    return _unavailable


def _check_slurm() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no sinfo/sbatch on PATH"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s"
    if proc.returncode != 0:
        return f"sinfo failed: {(proc.stderr or proc.stdout).strip()[:300]}"
    states = {s.strip().rstrip("*~#!%$@^-") for s in proc.stdout.split()}
    if not states & USABLE_NODE_STATES:
        return f"no idle/mixed/allocated node (sinfo states: {sorted(states) or 'none'})"
    return None


def require_slurm() -> None:
    """Skip the current test when Slurm is not usable; fail instead if CRUIJFF_REQUIRE_SLURM=1."""
    require_service("Slurm", slurm_unavailable_reason(), "CRUIJFF_REQUIRE_SLURM", START_HINT)


def requires_slurm(obj):
    """Decorate a test function (or every test method of a class) to need a running Slurm."""
    if inspect.isclass(obj):
        for name, member in list(vars(obj).items()):
            if name.startswith("test") and callable(member):
                setattr(obj, name, requires_slurm(member))
        return obj

    @functools.wraps(obj)  # pytest reads fixture names through __wrapped__
    def wrapper(*args, **kwargs):
        require_slurm()
        return obj(*args, **kwargs)

    return wrapper


def sbatch(args: list[str], *, cwd: Path | str | None = None) -> int:
    """Submit with `sbatch --parsable ARGS` and return the job id."""
    started = time.time()
    proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {args} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = int(proc.stdout.strip().split(";")[0])
    _submitted_at[job_id] = started
    return job_id


def job_info(job_id: int) -> dict[str, str] | None:
    """`scontrol show job -o` as a dict, or None once Slurm has forgotten the job (MinJobAge)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0 or "JobId=" not in proc.stdout:
        return None
    info: dict[str, str] = {}
    for item in proc.stdout.split():
        key, sep, value = item.partition("=")
        if sep:
            info.setdefault(key, value)
    return info


def job_state(job_id: int) -> str | None:
    """The live state (`scontrol show job`), or None when the job is no longer known there."""
    info = job_info(job_id)
    return None if info is None else info.get("JobState")


def wait_for_state(job_id: int, states: set[str], timeout: float = 30) -> str:
    """Wait (bounded) until the live job state is one of `states`; return it."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in states:
            return state
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not reach {sorted(states)} in {timeout:.0f} s "
                       f"(last state: {state})")


@dataclass(frozen=True)
class FinishedJob:
    job_id: int
    state: str        # COMPLETED, FAILED, TIMEOUT, CANCELLED, OUT_OF_MEMORY, NODE_FAIL, ...
    exit_code: str    # "code:signal"
    elapsed_s: float  # seconds from start to end as recorded by Slurm (1 s resolution)
    source: str       # "sacct -c" or "scontrol"


def _completion_record(job_id: int) -> FinishedJob | None:
    """The job's record from the job completion log (`sacct -c`), if written yet."""
    proc = subprocess.run(
        ["sacct", "-c", "-n", "-P", "-j", str(job_id), "-o", "JobID,State,ExitCode,Submit,"
         "ElapsedRaw"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return None
    since = _submitted_at.get(job_id)
    found = None
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < 5 or parts[0].strip() != str(job_id):
            continue
        # Ids restart at 1 if Slurm's state dir is wiped: ignore records from before our submit.
        if since is not None and parts[3]:
            try:
                if datetime.fromisoformat(parts[3]).timestamp() < since - 2:
                    continue
            except ValueError:
                pass
        elapsed = float(parts[4]) if parts[4].strip().isdigit() else float("nan")
        found = FinishedJob(job_id, parts[1].split()[0], parts[2], elapsed, "sacct -c")
    return found


def wait_for_job(job_id: int, timeout: float = 120, poll: float = 0.2) -> FinishedJob:
    """Wait (bounded) until the job has finished and return its final state.

    The final state comes from the job completion log (`sacct -c`, written when the job ends;
    this works without slurmdbd). While the job is still known to `scontrol show job` a final
    state there is used as a fallback if the completion record does not show up.
    """
    deadline = time.monotonic() + timeout
    last_live: dict[str, str] | None = None
    while True:
        record = _completion_record(job_id)
        if record is not None:
            return record
        info = job_info(job_id)
        if info is not None:
            last_live = info
        if time.monotonic() >= deadline:
            break
        time.sleep(poll)
    if last_live is not None and last_live.get("JobState") not in ACTIVE_STATES:
        return FinishedJob(job_id, last_live.get("JobState", "UNKNOWN"),
                           last_live.get("ExitCode", ""), float("nan"), "scontrol")
    raise TimeoutError(f"job {job_id} did not finish within {timeout:.0f} s (last seen: "
                       f"{(last_live or {}).get('JobState', 'not in scontrol')})")


# A job that outlives its time limit. Slurm keeps time limits in whole minutes (00:00:05 becomes
# 1 min) and slurmctld checks them on a fixed 30 s tick (PERIODIC_TIMEOUT, compiled in), so such a
# job ends 60-90 s after it starts. Submit it as early as possible and check it last: the fixture
# in test_slurm_cluster.py submits it when that module starts; a conftest hook may call
# `timeout_probe()` earlier (e.g. in pytest_collection_finish) so the wait overlaps other tests.
TIMEOUT_PROBE_ARGS = ["--time=00:00:05", "--mem=50M", "--job-name=cruijff-test-timeout"]
_timeout_probe: tuple[int, float] | None = None


def timeout_probe(out_dir: Path | str | None = None) -> tuple[int, float]:
    """(job id, time.monotonic() at submission) of the one time-limit probe job of this process."""
    global _timeout_probe
    if _timeout_probe is None:
        import tempfile

        out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="cruijff-"))
        submitted = time.monotonic()
        job = sbatch([*TIMEOUT_PROBE_ARGS, f"--output={out}/slurm-%j.out", "--wrap", "sleep 120"],
                     cwd=out)
        _timeout_probe = (job, submitted)
    return _timeout_probe


def wait_for(condition, timeout: float, what: str):
    """condition()'s first truthy value, polled every 0.5 s; the test fails after `timeout`."""
    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


ACCOUNTING_HINT = ("start Slurm with accounting: bash scripts/slurm/start.sh (as root, without "
                   "CRUIJFF_SLURM_ACCOUNTING=0)")


def slurm_accounting_unavailable_reason() -> str | None:
    """None when sacct reads slurmdbd here (each step's State, MaxRSS, TotalCPU), else why not."""
    reason = slurm_unavailable_reason()
    if reason is not None:
        return reason
    proc = subprocess.run(["sacct", "-n", "-X", "-j", "1", "-o", "JobID"], capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0:
        return f"sacct failed: {(proc.stderr or proc.stdout).strip()[:300]}"
    return None


def require_slurm_accounting() -> None:
    """Skip the current test when sacct has no slurmdbd; fail instead if CRUIJFF_REQUIRE_SLURM=1
    (CI's Slurm has accounting)."""
    require_service("Slurm accounting", slurm_accounting_unavailable_reason(),
                    "CRUIJFF_REQUIRE_SLURM", ACCOUNTING_HINT)
