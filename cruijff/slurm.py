"""Slurm batch scripts: `#SBATCH` lines from a resource profile, the site's prologue, then
the command that runs the stage as `cruijff run` does (`python -m cruijff stage`).

Every value that reaches an `#SBATCH` line is re-checked against a strict character set
(whatever built the profile), and the command is shell-quoted word by word, so no config value
can add a directive or run a command. The prologue (`slurm.prologue`) is the one exception by
design: the user's own shell lines, run as written, each re-checked to be one line that is no
directive (settings.prologue_line_problem).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cruijff import __version__
from cruijff.errors import CruijffError
from cruijff.fileio import load_yaml_mapping
from cruijff.settings import (
    SLURM_KEY,
    SLURM_TIME,
    SLURM_WORD,
    ResourceProfile,
    prologue_line_problem,
    refuse_unsafe_key,
)

SAFE_PATH = re.compile(r"^[A-Za-z0-9_./%@+,=:-]+$")

_KNOWN = ("nodes", "ntasks_per_node", "cpus_per_task", "time", "account", "partition")


def _checked(key: str, value: object) -> str:
    text = str(value)
    pattern = SLURM_TIME if key == "time" else SLURM_WORD
    if not pattern.fullmatch(text):
        raise CruijffError(f"resource {key} {text!r} contains characters not allowed in Slurm")
    return text


def sbatch_options(resources: ResourceProfile) -> list[str]:
    """`--key=value` options for a profile, in a stable order (known keys, then the rest);
    its per-stage overrides (`stages`) are never options."""
    values = resources.requests()
    options = [f"--{key.replace('_', '-')}={_checked(key, values[key])}"
               for key in _KNOWN if key in values]
    if "mem" in values:
        options.append(f"--mem={_checked('mem', values['mem'])}G")
    if "gres" in values:
        gres = values["gres"]
        spec = f"gpu:{gres}" if isinstance(gres, int) or str(gres).isdigit() else gres
        options.append(f"--gres={_checked('gres', spec)}")
    for key in sorted(resources.model_extra or {}):
        if not SLURM_KEY.fullmatch(key):
            raise CruijffError(f"resource key {key!r} is not a valid Slurm option name")
        try:
            refuse_unsafe_key(key)  # again: a profile may have been built around validation
        except ValueError as exc:
            raise CruijffError(str(exc)) from None
        value = values.get(key)
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            options.append(flag)
        elif value is not None and value is not False:
            options.append(f"{flag}={_checked(key, value)}")
    return options


def _safe_path(path: Path) -> str:
    text = str(path)
    if not SAFE_PATH.fullmatch(text):
        raise CruijffError(
            f"path {text!r} has characters Slurm cannot take in #SBATCH lines "
            "(use letters, digits and _ . / - )"
        )
    return text


def checked_prologue(lines: Sequence[object], where: str = "slurm.prologue") -> list[str]:
    """The prologue's lines, each checked again (whatever built them): CruijffError naming
    the first line that is not one shell line of its own."""
    for number, line in enumerate(lines, 1):
        problem = prologue_line_problem(line)
        if problem:
            raise CruijffError(f"{where}: line {number} {problem}")
    return [str(line) for line in lines]


def built_prologue(experiment_path: Path) -> list[str]:
    """The prologue an experiment was built with (its config.yaml's `config.slurm`), for
    the worker jobs of its runs; [] for one built without."""
    config_file = Path(experiment_path) / "config.yaml"
    data = load_yaml_mapping(config_file, "experiment config")
    slurm = (data.get("config") or {}).get("slurm") or {}
    lines = (slurm.get("prologue") or []) if isinstance(slurm, dict) else []
    if not isinstance(lines, list):
        raise CruijffError(f"{config_file}: config.slurm.prologue must be a list of lines")
    return checked_prologue(lines, f"{config_file}: config.slurm.prologue")


def stage_job_command(trial_dir: Path, stage: str) -> list[str]:
    """What a `<stage>.slurm` runs: the stage through the calls `cruijff run` makes for one
    stage (cruijff.by_hand), so its record, key and checks are the run's own."""
    return [sys.executable, "-m", "cruijff", "stage", str(trial_dir), stage]


def render_script(
    *,
    job_name: str,
    resources: ResourceProfile,
    command: list[str],
    workdir: Path,
    log_file: Path,
    description: str,
    prologue: Sequence[str] = (),
    stage_command: list[str] | None = None,
) -> str:
    """A standalone batch script: `sbatch <file>` runs the prologue's lines as written, then
    exactly `command` in `workdir`. `stage_command`, the stage's own command (what `command`
    runs, logs and records), is shown in a comment."""
    if not SLURM_WORD.fullmatch(job_name):
        raise CruijffError(f"job name {job_name!r} contains characters not allowed in Slurm")
    directives = [
        f"--job-name={job_name}",
        f"--output={_safe_path(log_file)}",
        *sbatch_options(resources),
    ]
    site = checked_prologue(prologue)
    shown = [] if stage_command is None else [
        "# `cruijff stage` runs it as `cruijff run` does (log, output checks, record in",
        f"# .cruijff/): `cruijff summary` counts it, `cruijff run` skips it. {STAGE_COMMAND_NOTE}",
        f"#   {' '.join(shlex.join(stage_command).split())}"]
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {option}" for option in directives),
        "",
        f"# {' '.join(description.split())}",
        f"# Generated by cruijff {__version__}; submit with: sbatch <this file>",
        *shown,
        *(["set -eo pipefail", "# slurm.prologue (the experiment's config), run as written:",
           *site, "set -u"] if site else ["set -euo pipefail"]),
        f"cd {shlex.quote(str(workdir))}",
        f"exec {shlex.join(command)}",
        "",
    ]
    return "\n".join(lines)


STAGE_COMMAND_NOTE = "The stage's command:"


def shown_stage_command(script: str) -> list[str]:
    """The stage's own command as a generated script shows it (the comment line under
    STAGE_COMMAND_NOTE): what to run without cruijff's record, e.g. to compare with it."""
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(STAGE_COMMAND_NOTE))
    return shlex.split(lines[start + 1].removeprefix("#"))


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's word on jobs: queued/running ones from squeue, finished ones from sacct.
    Jobs Slurm no longer knows (or no Slurm here) are simply absent. A job squeue still
    lists as COMPLETING (its nodes cleaning up) that sacct says has ended keeps sacct's
    word: how it ended (CANCELLED, FAILED, ...) is what a summary is read for."""
    from cruijff.sacct import FINAL_STATES

    ids = sorted({j for j in job_ids if j.isdigit()})
    if not ids or shutil.which("squeue") is None:
        return {}
    states: dict[str, str] = {}
    for command in (["sacct", "-c", "-n", "-X", "-P", "-j", ",".join(ids), "-o", "JobID,State"],
                    ["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T"]):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.splitlines():
            job, _, state = line.partition("|")
            job, word = job.strip(), state.split()[0] if state.strip() else ""
            if job not in ids or not word:
                continue
            if word == "COMPLETING" and states.get(job) in FINAL_STATES:
                continue
            states[job] = word
    return states


class SlurmSubmitError(CruijffError):
    """Worker jobs could not be submitted (no sbatch, or sbatch kept failing): the run stops
    with this one line instead of waiting forever for workers that never come."""


def worker_job_name(experiment: str, profile: str) -> str:
    """The name of an experiment's worker jobs for one resource profile (`squeue --name`)."""
    return f"cruijff-{experiment}-{profile}"


@dataclass(frozen=True)
class QueuedJob:
    """A job in Slurm's queue, as squeue shows it."""

    id: str
    name: str
    state: str
    partition: str
    reason: str
    """Why it waits (squeue's %r: 'Resources', 'Priority', 'ReqNodeNotAvail, ...'; 'None')."""

    @property
    def waiting(self) -> bool:
        return self.state not in ("RUNNING", "COMPLETING")


SQUEUE_FORMAT = "%i|%j|%T|%P|%r"
NODE_REASON = re.compile(r"node|drain|down|maint", re.IGNORECASE)
"""A pending reason that names the nodes (ReqNodeNotAvail, DOWN, DRAINED, ...): then the
nodes' own reasons (the admin's words) say more."""


def parse_squeue(text: str, experiment: str) -> list[QueuedJob]:
    """The experiment's worker jobs in `squeue -h -o '%i|%j|%T|%P|%r'` output (other jobs
    left out; a name is matched whole, so experiment `a` never claims `a-b`'s jobs)."""
    pattern = re.compile(re.escape(worker_job_name(experiment, "")) + r"profile\d+")
    jobs = []
    for line in text.splitlines():
        parts = line.split("|", 4)
        if len(parts) == 5 and parts[0].strip() and pattern.fullmatch(parts[1].strip()):
            jobs.append(QueuedJob(*(p.strip() for p in parts)))
    return jobs


def _ask(command: list[str], timeout: float) -> str | None:
    """A Slurm command's stdout; None if it is not here or does not answer (with the
    controller down, squeue and sinfo wait ~10 s before they give up)."""
    if shutil.which(command[0]) is None:
        return None
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def queued_jobs(experiment: str, timeout: float = 15) -> list[QueuedJob] | None:
    """This user's queued and running worker jobs of an experiment; None when Slurm cannot
    be asked."""
    out = _ask(["squeue", "--me", "-h", "-o", SQUEUE_FORMAT], timeout)
    return None if out is None else parse_squeue(out, experiment)


def unavailable_nodes(partitions: list[str], timeout: float = 15,
                      most: int = 3) -> list[str]:
    """'vm drained: <the admin's reason>' for (at most `most` of) the nodes of these
    partitions that Slurm keeps from new jobs."""
    out = _ask(["sinfo", "-h", "-R", "-N", "-p", ",".join(partitions), "-o", "%N|%T|%E"],
               timeout) or ""
    nodes: list[str] = []
    for line in out.splitlines():
        node, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        if node.strip() and state.strip():
            nodes.append(f"{node.strip()} {state.strip()}: {reason.strip() or 'no reason given'}")
    return nodes[:most] + ([f"and {len(nodes) - most} more"] if len(nodes) > most else [])


def waiting_note(jobs: list[QueuedJob], nodes: list[str] | None = None) -> str | None:
    """One line on the jobs that wait, grouped by state and reason, e.g. `waiting for Slurm:
    2 jobs PENDING (ReqNodeNotAvail, Reserved for maintenance); node vm drained: disk swap`;
    None if none waits."""
    groups: dict[tuple[str, str], int] = {}
    for job in jobs:
        if job.waiting:
            key = (job.state, "" if job.reason in ("", "None") else job.reason)
            groups[key] = groups.get(key, 0) + 1
    if not groups:
        return None
    parts = [f"{n} job{'s' if n > 1 else ''} {state}" + (f" ({reason})" if reason else "")
             for (state, reason), n in groups.items()]
    parts += [node if node.startswith("and ") else f"node {node}" for node in nodes or []]
    return "waiting for Slurm: " + "; ".join(parts)


def slurm_waits(experiment: str) -> tuple[list[QueuedJob], str | None]:
    """The experiment's worker jobs in the queue, and the line on why some wait (with the
    reasons of the nodes they wait for, asked only when their own reason points there)."""
    jobs = queued_jobs(experiment) or []
    partitions = sorted({j.partition for j in jobs if j.waiting and NODE_REASON.search(j.reason)})
    return jobs, waiting_note(jobs, unavailable_nodes(partitions) if partitions else None)


class QueueWatcher:
    """Why an experiment's worker jobs wait, for views that refresh (the live run table,
    `progress`): one reader asks squeue at most every `every_s` s, in the background (it takes
    ~10 s to fail when the controller is down), and `note()` shows its last answer meanwhile."""

    def __init__(self, experiment: str, every_s: float = 5.0) -> None:
        self.experiment, self.every_s = experiment, every_s
        self.last: str | None = None
        self._asked = float("-inf")
        self._busy = threading.Lock()

    def ask(self) -> str | None:
        """Ask squeue now: 'waiting for Slurm: 2 jobs PENDING (reason)', or None."""
        self.last = slurm_waits(self.experiment)[1]
        return self.last

    def note(self) -> str | None:
        """The last answer; asks again in the background when it is older than every_s."""
        if time.monotonic() - self._asked >= self.every_s and self._busy.acquire(False):
            self._asked = time.monotonic()

            def refresh() -> None:
                try:
                    self.ask()
                finally:
                    self._busy.release()

            threading.Thread(target=refresh, daemon=True).start()
        return self.last
