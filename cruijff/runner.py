"""One stage of one trial, without any orchestrator: loading an experiment as built, the
stage's key, whether it is done (the one reader every view and the run ask), running its
command as a subprocess with its log, verifying and recording the outcome, sharing a run
between trials, and --force's archive. cruijff/pipeline.py puts these together into a trial's
pipeline and a run; tests/test_runner.py tests them alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from cruijff.containment import check_contained, check_output_paths
from cruijff.errors import CruijffError
from cruijff.experiment import ARCHIVE, experiment_config, trial_dir_name
from cruijff.fileio import (
    dump_yaml,
    load_yaml_mapping,
    lock_within,
    parse_yaml,
)
from cruijff.models import file_digest, model_fingerprint
from cruijff.parse_cache import (
    PARSED_CONFIGS,
    ParsedMappings,
    read_cache,
    text_sha,
    write_cache,
)
from cruijff.registry import STAGES, file_stem
from cruijff.sacct import step_name, step_prefix
from cruijff.settings import OrchestrationConfig
from cruijff.stages import StageFailed
from cruijff.state import (
    RECORDS,
    STAGE_ENVIRONMENT,
    FailureClass,
    GpuUse,
    SlurmAccounting,
    StageRecord,
    Usage,
    damaged_output,
    digest,
    now,
    output_fingerprint,
    read_record,
    record_path,
    record_problem,
    runs_by_hand,
    where_now,
    write_record,
)

ERROR_TAIL_LINES = 8


@dataclass(frozen=True)
class Trial:
    id: str
    dir: Path
    stages: list[str]
    model: str
    dataset: str
    label: str
    control: str | None
    model_path: Path
    data_path: Path


@dataclass(frozen=True)
class Experiment:
    path: Path
    name: str
    trials: list[Trial]
    orchestration: OrchestrationConfig

    def trial(self, trial_id: str) -> Trial:
        for trial in self.trials:
            if trial.id == trial_id:
                return trial
        raise CruijffError(f"experiment {self.name} has no trial {trial_id!r}")


_LOADED: dict[Path, tuple[list[tuple[int, ...] | None], Experiment]] = {}
"""Experiments this process has parsed, with the signature of the files they were parsed from."""
LOADED_KEPT = 16
_LOADED_LOCK = threading.Lock()  # trial subflows load from many threads


def _stat(file: Path) -> tuple[int, ...] | None:
    try:
        s = file.stat()
    except OSError:
        return None
    return (s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)


def load_experiment(path: Path) -> Experiment:
    """An experiment as `cruijff build` wrote it. A run's trial subflows and stage tasks each
    load it; parsing every trial's config each time made a run quadratic in its trials, so
    a parse is reused while none of those files changed (the safety checks still run)."""
    path = Path(path).expanduser().resolve()
    cached = _LOADED.get(path)
    if cached is not None:
        signature, experiment = cached
        files = [path / "config.yaml", *(t.dir / "config.yaml" for t in experiment.trials)]
        if [_stat(f) for f in files] == signature:
            check_contained(path, [t.dir for t in experiment.trials])
            return experiment
    signature = [_stat(path / "config.yaml")]  # each taken before its read: a change re-parses
    parsed = ParsedMappings(path / RECORDS / PARSED_CONFIGS)
    data = experiment_config(path, parsed.mapping)
    trials = []
    for entry in data["trials"]:
        folder = path / trial_dir_name(entry["id"])
        signature.append(_stat(folder / "config.yaml"))
        trial = parsed.mapping(folder / "config.yaml", f"trial {entry['id']} config")
        trials.append(Trial(
            id=entry["id"], dir=folder, stages=list(trial["stages"]),
            model=trial["model"], dataset=trial["dataset"],
            label=trial["label"], control=trial.get("control"),
            model_path=Path(trial["model_path"]), data_path=Path(trial["data_path"]),
        ))
    orchestration = OrchestrationConfig(**data.get("config", {}).get("orchestration", {}))
    check_contained(path, [t.dir for t in trials])
    experiment = Experiment(path, data["name"], trials, orchestration)
    with _LOADED_LOCK:
        _LOADED.pop(path, None)
        if None not in signature:
            _LOADED[path] = (signature, experiment)
            while len(_LOADED) > LOADED_KEPT:
                _LOADED.pop(next(iter(_LOADED)))
    return experiment


def stage_command(trial: Trial, stage: str) -> list[str]:
    """The command that runs a stage of a trial, derived from the stage and its config on
    disk (never read back from the experiment's files). CruijffError (one line naming the
    file, key and path) if a path the config names as an output leads outside the trial
    folder: an edited `<stage>.yaml` must not make a run write (or `--force` move files)
    elsewhere."""
    spec = STAGES[stage]
    path = spec.config_path(trial.dir)
    config = load_yaml_mapping(path, f"{stage} config")
    try:
        outputs = spec.output_paths(trial.dir, config)
        command = spec.command(trial.dir, config, trial.model)
    except CruijffError as exc:
        raise CruijffError(f"{path}: {exc}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CruijffError(f"{path} is not a {stage} config cruijff can run "
                           f"({type(exc).__name__}: {exc}): rebuild the experiment with "
                           "`cruijff build --force`") from None
    check_output_paths(trial.dir.parent, trial.dir, path, outputs)
    return command


def select(experiment: Experiment, trials: str | None = None,
           stage: str | None = None) -> list[tuple[Trial, list[str]]]:
    """(trial, stages to consider) for `--trials a,b` and `--stage NAME`."""
    if stage is not None:
        STAGES[stage]  # an unknown stage: one line naming the stages
    chosen = experiment.trials
    if trials is not None:
        ids = [t.strip() for t in trials.split(",") if t.strip()]
        if not ids:
            raise CruijffError("--trials is empty: give trial ids such as a,b,c")
        known = {t.id for t in experiment.trials}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise CruijffError(
                f"unknown trial {unknown[0]!r}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                + f": experiment {experiment.name} has trials "
                f"{experiment.trials[0].id}..{experiment.trials[-1].id}"
            )
        wanted = set(ids)
        chosen = [t for t in experiment.trials if t.id in wanted]
    selection = [(t, [s for s in t.stages if stage is None or s == stage]) for t in chosen]
    return [(t, stages) for t, stages in selection if stages]


@functools.cache
def _backend_version(distribution: str) -> str:
    """A process runs the code it imported: its backends' versions do not change under it."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def stage_key(trial: Trial, stage: str, runs: dict[str, str | None] | None = None) -> str:
    """A hash of everything that determines the stage's outputs: its config's data (parsed and
    written again, so a comment or layout edit changes nothing) with this trial's paths taken
    out, the data's content, the model's files, the backend's version, and the runs of the
    stages before it. Equal keys mean equal outputs (so they can be shared). `runs`: the run
    id of each earlier stage, from records the caller has just read (else they are read)."""
    path = STAGES[stage].config_path(trial.dir)
    return _key_of(trial, stage, CONFIG_DATA.text(trial.dir, path), runs)


def _text_key(trial: Trial, stage: str) -> str:
    """The key as records written before stage_key hashed the config's data have it: of the
    config's text. The same for a config without comments (what the build writes is what
    dump_yaml writes), not for one with them (a finetune.yaml from a commented template)."""
    path = STAGES[stage].config_path(trial.dir)
    return _key_of(trial, stage, path.read_text(encoding="utf-8"))


def _key_of(trial: Trial, stage: str, config: str,
            runs: dict[str, str | None] | None = None) -> str:
    for path, placeholder in ((trial.dir, "<trial>"), (trial.model_path, "<model>"),
                              (trial.data_path, "<data>")):
        config = config.replace(str(path), placeholder)
    upstream = {}
    for earlier in trial.stages[: trial.stages.index(stage)]:
        if runs is not None and earlier in runs:
            upstream[earlier] = runs[earlier]
            continue
        record = read_record(trial.dir, earlier)
        upstream[earlier] = record.run_id if record else None
    return digest({
        "stage": stage,
        "config": config,
        "data": file_digest(trial.data_path) if trial.data_path.is_file() else None,
        "model": [trial.model, model_fingerprint(trial.model_path)],
        "backend": _backend_version(STAGES[stage].backend),
        "upstream": upstream,
    })


def key_matches(trial: Trial, stage: str, recorded: str, key: str) -> bool:
    """A record's key stands for `key` (this trial's stage_key, or a sharing trial's): equal,
    or a key from before stage_key hashed the config's data that still matches the config's
    text, while the config's data gives `key` (so no experiment re-runs for the change)."""
    if recorded == key:
        return True
    return recorded == _text_key(trial, stage) and stage_key(trial, stage) == key


class ConfigData:
    """A config's text as its data: dump_yaml(parse_yaml(text)). Parsing a commented
    finetune.yaml takes milliseconds, so `summary` of 1,000 trials would spend seconds on it:
    the result is kept by the text's sha256, in this process and in the trial's
    .cruijff/config-data.json (cruijff/parse_cache.py)."""

    FILE = "config-data.json"

    def __init__(self) -> None:
        self._known: dict[str, str | None] = {}  # text sha256 -> data text (None: the same)
        self._read: set[str] = set()  # trial folders whose file is read
        self._lock = threading.Lock()

    def text(self, trial_dir: Path, path: Path) -> str:
        raw = path.read_text(encoding="utf-8")
        sha = text_sha(raw)
        if str(trial_dir) not in self._read:
            stored = read_cache(trial_dir / RECORDS / self.FILE)
            with self._lock:
                self._known.update(stored)
                self._read.add(str(trial_dir))
        if sha in self._known:
            known = self._known[sha]
            return raw if known is None else known
        try:
            data = dump_yaml(parse_yaml(raw, str(path)))
        except CruijffError:  # unreadable: its text stands for it (the stage will say why)
            data = raw
        with self._lock:
            self._known[sha] = None if data == raw else data
            self._save(trial_dir, sha)
        return data

    def _save(self, trial_dir: Path, sha: str) -> None:
        """Add one entry to the trial's file (as another process may have left it)."""
        file = trial_dir / RECORDS / self.FILE
        texts = {k: v for k, v in read_cache(file).items() if isinstance(k, str)}
        texts[sha] = self._known[sha]
        write_cache(file, texts)


CONFIG_DATA = ConfigData()


def is_done(trial: Trial, stage: str, key: str) -> bool:
    """Recorded done with this key, and its verified outputs are still all there."""
    record = read_record(trial.dir, stage)
    return (record is not None and record.is_done
            and key_matches(trial, stage, record.key, key)
            and damaged_output(trial.dir, record) is None)


DONE_STATES = ("done", "reused")


@dataclass
class StageState:
    """Where one stage of a trial stands, as every view shows it."""

    state: str
    """done, reused, outdated (done, but its inputs changed since: it will run again),
    damaged (done, but an output file is gone or truncated since: it will run again),
    failed, running, interrupted, pending, blocked (an earlier stage failed)."""
    record: StageRecord | None
    detail: str | None = None
    """What is damaged (or, for a stage without a record, why its record is unreadable)."""

    @property
    def is_done(self) -> bool:
        return self.state in DONE_STATES


def trial_states(trial: Trial, stages: list[str], *, held: bool) -> dict[str, StageState]:
    """The one reader of "is this stage done": each stage's state from its record, its current
    key and its outputs, in pipeline order (a stage after one that will run again is outdated,
    after a failed one blocked). `held`: a `cruijff run` holds the experiment now (else a
    record left 'running' was interrupted)."""
    states: dict[str, StageState] = {}
    runs: dict[str, str | None] = {}  # each earlier stage's run id (its key includes them)
    blocked = rerun = False  # an earlier stage failed / will run again
    for stage in trial.stages:
        record = read_record(trial.dir, stage)
        detail = None
        if record is None:
            state = "blocked" if blocked else "pending"
            detail = record_problem(trial.dir, stage)  # None, or why its record is unreadable
        elif (record.status == "running" and not held
              and not runs_by_hand(trial.dir, stage)):
            state = "interrupted"  # neither a run nor a job by hand is running it
        elif record.is_done and (rerun or not key_matches(trial, stage, record.key,
                                                          stage_key(trial, stage, runs))):
            state = "outdated"
        elif record.is_done and (detail := damaged_output(trial.dir, record)):
            state = "damaged"
        else:
            state = record.status
        if stage in stages:
            states[stage] = StageState(state, record, detail)
        blocked = blocked or state in ("failed", "interrupted")
        rerun = rerun or state not in DONE_STATES
        runs[stage] = record.run_id if record else None
    return states


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork


def _die_with_parent() -> None:
    """In the forked child, before exec: if the thread that started the stage dies (its
    process killed, even by SIGKILL), the stage is killed too instead of running on orphaned.
    Only a pre-resolved C call runs here, as is safe between fork and exec."""
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def log_tail(path: Path, lines: int = ERROR_TAIL_LINES) -> str:
    """The last non-empty lines of a log: what a failure summary shows."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def _attempt_logs(folder: Path, stage: str) -> list[tuple[int, Path]]:
    """(number, path) of a stage's attempt logs, in order."""
    stem = file_stem(stage)
    return sorted((int(m.group(1)), p) for p in folder.glob(f"{stem}-attempt*.log")
                  if (m := re.fullmatch(rf"{re.escape(stem)}-attempt(\d+)\.log", p.name)))


def _next_log(folder: Path, stage: str) -> Path:
    """A new log file per execution, numbered on from the last one: never overwrites the
    log of an earlier execution (one with another key, say)."""
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [n for n, _ in _attempt_logs(folder, stage)]
    return folder / f"{file_stem(stage)}-attempt{max(numbers, default=0) + 1}.log"


STOP = threading.Event()
"""Set when the user stops a run (Ctrl-C, SIGTERM): no new stage starts, running ones end."""
STOP_GRACE_S = 10.0
"""How long a stopped stage may take to exit on SIGTERM before it is killed."""
_stages_running: set[subprocess.Popen] = set()
_stages_lock = threading.Lock()


_stopped_at: list[str] = []
"""When the current stop was asked for (record timestamps' format), while STOP is set."""


def request_stop(reason: str) -> None:
    """Stop the run: refuse new stages, SIGTERM the running ones (their whole process group),
    SIGKILL whichever is still there after STOP_GRACE_S."""
    if not STOP.is_set():
        _stopped_at[:] = [now()]
    STOP.set()
    with _stages_lock:
        procs = list(_stages_running)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    def kill_stragglers() -> None:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

    if procs:
        threading.Timer(STOP_GRACE_S, kill_stragglers).start()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While a run runs in this (main) thread: the first Ctrl-C or SIGTERM stops it cleanly
    (request_stop), a second Ctrl-C aborts at once."""
    STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if STOP.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request_stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def execute_stage(trial: Trial, stage: str, key: str, *, threads: int | None = None,
                  grown: dict[str, Any] | None = None) -> StageRecord:
    """Run one stage's command, verify its outputs, and record the outcome atomically. The
    command is derived from the stage and its config (never read from the experiment's
    files), once that config is checked to write only into the trial. It runs under
    `cruijff.usage` (what it used goes into the record) and, inside a Slurm worker job, as its
    own job step (so sacct accounts for this attempt alone). `grown`: what this attempt's job
    asks for beyond the trial's profile (grow_on_oom), kept in the record."""
    command = stage_command(trial, stage)
    previous = read_record(trial.dir, stage)
    retry = previous is not None and previous.key == key
    attempts = previous.attempts + 1 if retry else 1
    history = [*previous.history, _attempt_summary(previous)] if retry else []
    log = _next_log(trial.dir / "logs", stage)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    record = StageRecord(stage, key, "running", attempts, log=str(log.relative_to(trial.dir)),
                         where=where_now(), history=history,
                         environment={k: env[k] for k in STAGE_ENVIRONMENT if k in env},
                         grown=grown)
    measured = usage_path(trial.dir, stage)
    measured.unlink(missing_ok=True)
    work_path(trial.dir, stage).unlink(missing_ok=True)
    failure_path(trial.dir, stage).unlink(missing_ok=True)
    env["CRUIJFF_WORK_REPORT"] = str(work_path(trial.dir, stage))
    env[FAILURE_REPORT] = str(failure_path(trial.dir, stage))
    # what the stage cannot read from the trial's files (its Inspect logs carry them:
    # cruijff/stages/eval.py STAGE_RUN_ENVIRONMENT)
    env.update(CRUIJFF_STAGE_KEY=key, CRUIJFF_STAGE_ATTEMPT=str(attempts),
               CRUIJFF_RUN_ID=record.run_id)
    if env.get("CRUIJFF_USAGE", "on") != "off":
        command = [sys.executable, "-m", "cruijff.usage", "--out", str(measured), "--",
                   *command]
    name = step_name("cruijff", trial.dir.parent.name, trial.id, stage, f"a{attempts}",
                     record.run_id[:8])
    step = step_prefix(name)
    if step:
        record.slurm = SlurmAccounting(job_id=env["SLURM_JOB_ID"], step_name=name)
        command = [*step, *command]
    write_record(trial.dir, record)
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        # Its own process group: a Ctrl-C reaches only cruijff, which then stops the stage
        # (and everything the stage started) itself, and records why.
        proc = subprocess.Popen(command, cwd=trial.dir, stdout=out,
                                stderr=subprocess.STDOUT, env=env, process_group=0,
                                preexec_fn=_die_with_parent)
        with _stages_lock:
            _stages_running.add(proc)
        if STOP.is_set():  # stopped while this stage was starting
            request_stop("stop")
        try:
            _import_for_verify(stage)
            proc.wait()
        finally:
            with _stages_lock:
                _stages_running.discard(proc)
    record.duration_s = round(time.monotonic() - start, 2)
    record.finished = now()
    throughput: dict[str, float] = {}
    if proc.returncode != 0 and STOP.is_set():
        record.status = "interrupted"
        record.error = (f"stopped by the user after {record.duration_s:g} s: `cruijff run` "
                        "runs it again")
    elif proc.returncode != 0:
        record.status = "failed"
        record.error = f"exit code {proc.returncode}\n{log_tail(log)}"
        record.failure, record.failure_reason = _failure_class(trial.dir, stage,
                                                               proc.returncode)
    else:
        config = load_yaml_mapping(STAGES[stage].config_path(trial.dir), f"{stage} config")
        try:
            verified = STAGES[stage].verify(trial.dir, config)
        except StageFailed as exc:  # deterministic only where the stage says so
            record.status, record.error = "failed", str(exc)
            record.failure = "deterministic" if getattr(exc, "deterministic", False) \
                else "transient"
            record.failure_reason = (str(exc).splitlines() or [""])[0]
        else:
            record.status = "done"
            record.outputs, record.metrics = verified.outputs, verified.metrics
            record.fingerprint = output_fingerprint(trial.dir, verified.outputs)
            throughput = verified.throughput
    if record.deterministic:
        why = record.failure_reason or "it would fail the same way again"
        record.error = f"not retried: {why} (deterministic)\n{record.error}"
    record.usage = read_usage(trial, stage, throughput)
    write_record(trial.dir, record)
    return record


def _import_for_verify(stage: str) -> None:
    """The stage's verify_imports, while it runs. A module that fails to import is left to
    verify, which reports it where a stage's failures are reported."""
    for module in STAGES[stage].verify_imports:
        with contextlib.suppress(Exception):
            importlib.import_module(module)


def usage_path(trial_dir: Path, stage: str) -> Path:
    """Where `python -m cruijff.usage` writes what an attempt used."""
    return trial_dir / RECORDS / f"{file_stem(stage)}.usage.json"


FAILURE_REPORT = "CRUIJFF_FAILURE_REPORT"
"""The file `cruijff exec` writes when its stage raises: {"class": "deterministic" or
"transient", "reason": one line} (cruijff.attempts.report_failure). The exit status cannot
carry it: a stage's own exit codes mean what the stage says."""


def failure_path(trial_dir: Path, stage: str) -> Path:
    """Where an attempt's failure report is written (FAILURE_REPORT)."""
    return trial_dir / RECORDS / f"{file_stem(stage)}.failure.json"


def _failure_class(trial_dir: Path, stage: str,
                   returncode: int) -> tuple[FailureClass, str | None]:
    """A failed attempt's class and reason: killed by a signal is transient, whatever it
    wrote; else what its failure report says; with no (readable) report, transient."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return "transient", f"killed by {name}"
    try:
        report = json.loads(failure_path(trial_dir, stage).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "transient", None
    kind = report.get("class") if isinstance(report, dict) else None
    reason = report.get("reason") if isinstance(report, dict) else None
    return ("deterministic" if kind == "deterministic" else "transient",
            reason.splitlines()[0][:500] if isinstance(reason, str) and reason else None)


def work_path(trial_dir: Path, stage: str) -> Path:
    """Where a stage that can may say what its own work loop got through (CRUIJFF_WORK_REPORT:
    cruijff's fine-tune recipe writes training tokens and the training loop's time)."""
    return trial_dir / RECORDS / f"{file_stem(stage)}.work.json"


def _work_report(trial_dir: Path, stage: str) -> dict[str, float]:
    try:
        figures = json.loads(work_path(trial_dir, stage).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(figures, dict):
        return {}
    return {k: float(v) for k, v in figures.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def read_usage(trial: Trial, stage: str, throughput: dict[str, float]) -> Usage | None:
    """What the attempt's launcher measured, with what the stage reported of its work and
    the work's size (from the trial's config); None if nothing was measured (CRUIJFF_USAGE=off,
    or a launcher killed before its first snapshot): measuring never fails a stage."""
    try:
        figures = json.loads(usage_path(trial.dir, stage).read_text(encoding="utf-8"))
        usage = _USAGE.validate_python(figures)
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None
    figures = {**throughput, **_work_report(trial.dir, stage)}
    torch_peaks = {k: int(figures.pop(k)) for k in TORCH_PEAKS if k in figures}
    if torch_peaks:  # the recipe's own view of its device, beside NVML's (or alone)
        if not usage.gpus:
            usage.gpus.append(GpuUse(device="0"))
        for key, value in torch_peaks.items():
            setattr(usage.gpus[0], key, value)
    usage.throughput = figures
    sizes = _trial_sizes(trial).get(stage)
    if isinstance(sizes, dict):
        usage.size = {k: float(v) for k, v in sizes.items()
                      if isinstance(v, int | float) and not isinstance(v, bool)}
    return usage


_USAGE = TypeAdapter(Usage)
TORCH_PEAKS = ("torch_peak_allocated_mib", "torch_peak_reserved_mib")


def _trial_sizes(trial: Trial) -> dict[str, Any]:
    """The work's size per stage, as the build wrote it into the trial's config.yaml."""
    try:
        sizes = load_yaml_mapping(trial.dir / "config.yaml", f"trial {trial.id} config").get(
            "sizes")
    except CruijffError:
        return {}
    return sizes if isinstance(sizes, dict) else {}


def _attempt_summary(record: StageRecord) -> dict[str, Any]:
    """An earlier attempt as its record's history keeps it: an OUT_OF_MEMORY's figure and
    what it asked for survive the retry that succeeds."""
    summary: dict[str, Any] = {"attempt": record.attempts, "status": record.status,
                               "where": record.where, "error": record.error}
    if record.outcome:
        summary["outcome"] = record.outcome
    if record.failure:
        summary["failure"] = record.failure
    if record.usage:
        summary["wall_s"] = record.usage.wall_s
    peaks = [record.usage.peak_rss_mib if record.usage else None,
             record.slurm.max_rss_mib if record.slurm else None]
    if any(p is not None for p in peaks):  # the launcher's or sacct's, whichever saw more
        summary["peak_rss_mib"] = max(p for p in peaks if p is not None)
    if record.slurm and record.slurm.requested:
        summary["requested"] = record.slurm.requested
    if record.grown:
        summary["grown"] = record.grown
    return summary


def link_shared(trial: Trial, owner: Trial, stage: str) -> StageRecord:
    """Make `trial` use `owner`'s finished run of a shared stage (each of the stage's folders
    becomes a link to the owner's) and record that."""
    done = read_record(owner.dir, stage)
    if done is None or not done.is_done:
        raise CruijffError(f"trial {owner.id} has no finished {stage} to share")
    for name in STAGES[stage].folders:
        folder = trial.dir / name
        if folder.is_symlink():
            folder.unlink()
        elif folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        elif folder.exists():
            _archive_paths(trial.dir.parent, trial, [folder])
        folder.symlink_to(owner.dir / name)
    record = StageRecord(stage, done.key, "reused", run_id=done.run_id, finished=now(),
                         outputs=done.outputs, metrics=done.metrics, reused_from=owner.id,
                         where=done.where, fingerprint=done.fingerprint)
    write_record(trial.dir, record)
    return record


def _archive_paths(experiment_path: Path, trial: Trial, paths: list[Path],
                   stamp: str | None = None) -> Path:
    stamp = stamp or datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    dest = experiment_path / ARCHIVE / stamp / trial_dir_name(trial.id)
    for path in paths:
        if not (path.exists() or path.is_symlink()):
            continue
        target = dest / path.relative_to(trial.dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target))
    return dest.parent


def archive_stages(experiment: Experiment, selection: list[tuple[Trial, list[str]]]) -> Path:
    """--force: move the selected stages' outputs, logs and records into the archive."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    folder = experiment.path / ARCHIVE / stamp
    for trial, stages in selection:
        for stage in stages:
            spec = STAGES[stage]
            config = load_yaml_mapping(spec.config_path(trial.dir), f"{stage} config")
            paths = [record_path(trial.dir, stage), usage_path(trial.dir, stage),
                     work_path(trial.dir, stage), failure_path(trial.dir, stage),
                     *(p for _, p in _attempt_logs(trial.dir / "logs", stage))]
            links = [trial.dir / name for name in spec.folders
                     if (trial.dir / name).is_symlink()]
            paths += links if spec.shared and links else spec.artifacts(trial.dir, config)
            _archive_paths(experiment.path, trial, paths, stamp)
            for name in spec.folders:
                (trial.dir / name).mkdir(exist_ok=True)
    return folder


@contextmanager
def run_lock(experiment: Experiment) -> Iterator[None]:
    """One `cruijff run` per experiment at a time; the OS frees the lock if the process dies."""
    path = experiment.path / RECORDS / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as handle:
        try:
            lock_within(handle)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise CruijffError(
                f"experiment {experiment.name} is already being run ({holder}): wait for it to "
                "finish or stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                 "since": now()}))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_writable(experiment: Experiment) -> None:
    """A run writes records, logs and outputs into the experiment: find out before anything
    starts, rather than from a stage that cannot record its outcome."""
    folder = experiment.path / RECORDS
    try:
        folder.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CruijffError(f"cannot write to {experiment.path}: {exc.strerror}: make it writable "
                           "for you (or copy the experiment somewhere writable) and run again"
                           ) from None


def record_interrupted(selection: list[tuple[Trial, list[str]]]) -> None:
    """After a stopped run's workers are gone: a stage still 'running', or one that failed
    since the stop (a Slurm job's cancel signals every process of the job, the stage too,
    and its worker may record that as a failure), was interrupted by the user."""
    since = _stopped_at[0] if STOP.is_set() and _stopped_at else None
    if since is None:
        return
    for trial, stages in selection:
        for stage in stages:
            record = read_record(trial.dir, stage)
            if record is not None and (record.status == "running" or (
                    record.status == "failed" and (record.finished or "") >= since)):
                record.status = "interrupted"
                record.error = "stopped by the user: `cruijff run` runs it again"
                write_record(trial.dir, record)


def unlocked(experiment: Experiment) -> bool:
    """No `cruijff run` holds this experiment now. Asks for a shared lock and writes nothing,
    so a look (summary, progress) never blocks a run starting at that moment, and works on an
    experiment the user may only read."""
    path = experiment.path / RECORDS / "run.lock"
    try:
        handle = path.open("r", encoding="utf-8")
    except FileNotFoundError:
        return True
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def unfinished_trials(experiment: Experiment) -> list[Trial]:
    """Trials with a failed or interrupted stage, or one left 'running' by a run that is gone
    (call only while no run holds the experiment): what a re-run of failed trials picks up."""
    unfinished = ("failed", "running", "interrupted")
    return [t for t in experiment.trials
            if any((r := read_record(t.dir, s)) is not None and r.status in unfinished
                   for s in t.stages)]


def pending(selection: list[tuple[Trial, list[str]]]) -> list[tuple[Trial, str]]:
    """Stages not done with their current key. A stage whose upstream will run counts too."""
    return [(trial, stage) for trial, stages in selection
            for stage, state in trial_states(trial, stages, held=True).items()
            if not state.is_done]


def summarize(record: StageRecord | None) -> dict[str, Any]:
    if record is None:
        return {"status": "pending"}
    return {"status": record.status, "attempts": record.attempts,
            "duration_s": record.duration_s, "metrics": record.metrics, "error": record.error,
            "reused_from": record.reused_from}
