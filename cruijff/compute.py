"""What stages cost, and what they should ask Slurm for: `cruijff resources` and build warnings.

History is every stage attempt recorded done with a final `usage` (not reused), from
experiment folders and, optionally, the results store, so a lab's history accumulates. A
suggestion per model x stage is a high quantile of what those runs used times a margin:

- memory per run: max(usage.peak_rss_mib, sacct's MaxRSS), never scaled by data size;
- time per run: its wall time scaled to the target's size: a fine-tune by epochs x
  train_examples, an eval by eval_samples; the part before the stage's own work (startup,
  loading) is not scaled when the stage reports its work time (throughput train_s/eval_s),
  else the whole wall time scales, and the suggestion says so;
- a model that never ran, where another size of its lineage did (models.lineage): that size's
  runs, memory and time scaled by parameter count, said so;
- never below an OUT_OF_MEMORY/TIMEOUT attempt's request x 1.25;
- gres: the most GPUs a run used (a device with a memory peak).

Fewer runs than `min_runs` give no figure. Memory figures are MiB; Slurm's G is 1024 MiB.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cruijff.config_edit import Edit, edit_resources
from cruijff.errors import CruijffError
from cruijff.experiment import experiment_config, stage_profile_of, trial_dir_name
from cruijff.fileio import load_yaml_mapping
from cruijff.models import lineage, model_key
from cruijff.registry import STAGES
from cruijff.settings import ExperimentConfig, gpu_count, slurm_seconds, slurm_time
from cruijff.state import StageRecord, read_record

GIB = 1024
"""MiB in Slurm's G."""
FLOORED = {"OUT_OF_MEMORY": "mem", "TIMEOUT": "time"}
"""Outcomes whose request a suggestion never goes below (× FLOOR_FACTOR)."""
FLOOR_FACTOR = 1.25
TIME_STEP_S = 300
"""Suggested times are rounded up to 5 minutes, and are at least that."""
WASTE_FACTOR = 4
"""A build warns of a profile asking more than this many times what a past run used."""
HISTORY_EXPERIMENTS = 200
"""A build looks at this many of the newest experiments under its root."""
GPU_IN_USE = 0.05
"""A device counts as used when its memory peak passed this share of its total."""


# ---------------------------------------------------------------------------------------------
# Sizes, written at build into each trial's config.yaml


@functools.lru_cache(maxsize=64)
def _list_length(path: Path, stamp: tuple[int, int], key: str) -> int | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    items = data.get(key) if isinstance(data, dict) else None
    return len(items) if isinstance(items, list) else None


def records_in(path: Path | str, key: str) -> int | None:
    """How many records a JSON dataset file's `key` list holds (parsed once per file
    version); None for another format or an unreadable file."""
    path = Path(path)
    if path.suffix != ".json":
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return _list_length(path, (stat.st_size, stat.st_mtime_ns), key)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _finetune_size(config: dict[str, Any]) -> dict[str, float]:
    size: dict[str, float] = {}
    epochs, batch = _int(config.get("epochs")), _int(config.get("batch_size"))
    dataset = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
    examples = (records_in(dataset["data_files"], str(dataset.get("field", "train")))
                if isinstance(dataset.get("data_files"), str) else None)
    steps = _int(config.get("max_steps_per_epoch"))
    if examples is not None and steps and batch:  # an epoch capped at steps x batch x accum
        examples = min(examples, steps * batch * (_int(config.get(
            "gradient_accumulation_steps")) or 1))
    for name, value in (("epochs", epochs), ("train_examples", examples), ("batch_size", batch)):
        if value is not None:
            size[name] = value
    return size


def _split_records(config: dict[str, Any], split: Any) -> int | None:
    args = config.get("task_args") if isinstance(config.get("task_args"), dict) else {}
    path = args.get("data_path")
    return records_in(path, str(split)) if isinstance(path, str) else None


def _eval_size(config: dict[str, Any]) -> dict[str, float]:
    limit = _int(config.get("limit"))
    args = config.get("task_args") if isinstance(config.get("task_args"), dict) else {}
    available = _split_records(config, args.get("split", "test"))
    samples = min(x for x in (limit, available) if x is not None) if (
        limit is not None or available is not None) else None
    return {} if samples is None else {"eval_samples": samples}


def _prompt_opt_size(config: dict[str, Any]) -> dict[str, float]:
    most, candidates = _int(config.get("max_samples")), _int(config.get("max_candidates"))
    available = _split_records(config, config.get("split", "validation"))
    per = min(x for x in (most, available) if x is not None) if (
        most is not None or available is not None) else None
    return {} if per is None or not candidates else {"eval_samples": per * candidates}


SIZERS = {"finetune": _finetune_size, "eval": _eval_size, "prompt_opt": _prompt_opt_size}
"""What a stage's work size is, from its resolved config: a fine-tune's epochs, training
examples (per epoch) and batch; an eval's samples (limit, or the split's records); prompt
optimization's samples over all candidates (at most)."""


def stage_size(stage: str, config: dict[str, Any], parameters: int | None) -> dict[str, float]:
    """The size of one stage's work for a trial (what applies), for scaling estimates."""
    size = SIZERS[stage](config) if stage in SIZERS else {}
    if parameters:
        size["parameters"] = parameters
    return size


def _work(size: dict[str, Any]) -> tuple[float, str] | None:
    """The measure a stage's time scales with, and its name."""
    if size.get("epochs") and size.get("train_examples"):
        return float(size["epochs"]) * float(size["train_examples"]), "epochs × train_examples"
    if size.get("eval_samples"):
        return float(size["eval_samples"]), "eval_samples"
    return None


# ---------------------------------------------------------------------------------------------
# History


@dataclass(frozen=True)
class Run:
    """One finished, measured stage attempt."""

    where: str
    """'<experiment>/trial-<id>': how messages name it."""
    stage: str
    model: str
    key: str
    finished: str | None
    wall_s: float
    memory_mib: float | None
    work_s: float | None
    """The stage's own work time (throughput train_s / eval_s): the part that scales."""
    gpus: int
    size: dict[str, float]

    @property
    def day(self) -> str:
        return (self.finished or "")[:10] or "date unknown"


@dataclass(frozen=True)
class Limit:
    """An attempt Slurm ended for running out of memory or time, and what it had asked for."""

    where: str
    key: str
    stage: str
    outcome: str
    mem_mib: float | None
    time_s: float | None


@dataclass
class History:
    runs: list[Run] = field(default_factory=list)
    limits: list[Limit] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)
    """The experiment folders read (from disk or the store)."""
    problems: list[str] = field(default_factory=list)
    """Sources that could not be read (the store), one line each."""
    _seen: set[tuple[str, ...]] = field(default_factory=set, repr=False)

    def add_run(self, identity: tuple[str, ...], run: Run) -> None:
        """Add a run once, however many sources hold it (a root and the store)."""
        if identity not in self._seen:
            self._seen.add(identity)
            self.runs.append(run)

    def add_limit(self, identity: tuple[str, ...], limit: Limit) -> None:
        if identity not in self._seen:
            self._seen.add(identity)
            self.limits.append(limit)

    @property
    def experiments(self) -> int:
        return len(self.sources)

    def of(self, key: str, stage: str) -> list[Run]:
        return [r for r in self.runs if r.key == key and r.stage == stage]


def gpus_used(record: StageRecord) -> int:
    """Devices with a memory peak: NVML's above GPU_IN_USE of the device, or torch's own."""
    used = 0
    for gpu in record.usage.gpus if record.usage else []:
        nvml = gpu.peak_used_mib or 0
        torch = max(gpu.torch_peak_allocated_mib or 0, gpu.torch_peak_reserved_mib or 0)
        used += bool(torch > 0 or (nvml > GPU_IN_USE * gpu.total_mib if gpu.total_mib
                                   else nvml > 0))
    return used


def memory_used(record: StageRecord) -> float | None:
    """MiB: the most the launcher or sacct saw."""
    figures = [record.usage.peak_rss_mib if record.usage else None,
               record.slurm.max_rss_mib if record.slurm else None]
    known = [f for f in figures if f is not None]
    return max(known) if known else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _limits_of(record: StageRecord) -> list[tuple[str, dict[str, Any], str]]:
    """(outcome, requested, attempt) of this record's attempts that ran out of memory or
    time: the record itself, and the earlier attempts its history keeps."""
    found = []
    if record.outcome in FLOORED and record.slurm is not None:
        found.append((record.outcome, record.slurm.requested, str(record.attempts)))
    for attempt in record.history:
        requested = attempt.get("requested")
        if attempt.get("outcome") in FLOORED and isinstance(requested, dict):
            found.append((attempt["outcome"], requested, str(attempt.get("attempt"))))
    return found


def read_experiment(path: Path, history: History) -> None:
    """Add an experiment folder's measured runs and its out-of-memory/time attempts."""
    path = path.resolve()
    data = experiment_config(path)
    history.sources.add(str(path))
    for entry in data["trials"]:
        if not isinstance(entry, dict) or "id" not in entry:
            continue
        trial_dir = path / trial_dir_name(str(entry["id"]))
        try:
            trial = load_yaml_mapping(trial_dir / "config.yaml", "trial config")
        except CruijffError:
            continue
        model = str(trial.get("model", entry.get("model", "")))
        try:
            key = model_key(model)
        except CruijffError:
            continue
        sizes = trial.get("sizes") if isinstance(trial.get("sizes"), dict) else {}
        where = f"{data['name']}/{trial_dir.name}"
        for stage in trial.get("stages") or []:
            record = read_record(trial_dir, str(stage))
            if record is None:
                continue
            for outcome, requested, attempt in _limits_of(record):
                history.add_limit(
                    (str(path), where, record.stage, "limit", attempt, outcome),
                    Limit(where, key, record.stage, outcome, _number(requested.get("mem_mib")),
                          _number(requested.get("time_s"))))
            usage = record.usage
            if record.status != "done" or usage is None or not usage.final:
                continue
            size = dict(usage.size) or dict(sizes.get(record.stage) or {})
            work = usage.throughput.get("train_s", usage.throughput.get("eval_s"))
            history.add_run((str(path), str(entry["id"]), record.stage, record.run_id), Run(
                where, record.stage, model, key, record.finished, usage.wall_s,
                memory_used(record), work, gpus_used(record), size))


def experiments_under(root: Path, newest: int | None = None) -> list[Path]:
    """The experiment folders in `root` (each with a config.yaml written by cruijff build),
    newest first (by that file's time), at most `newest` of them."""
    try:
        folders = [p for p in Path(root).iterdir()
                   if p.is_dir() and not p.name.startswith(".") and (p / "config.yaml").is_file()]
    except OSError:
        return []
    folders.sort(key=lambda p: (p / "config.yaml").stat().st_mtime, reverse=True)
    return folders[:newest] if newest is not None else folders


def gather(experiments: Iterable[Path], roots: Iterable[Path], *, store: str | None = None,
           newest: int | None = None) -> History:
    """The runs of these experiments, of every experiment under each root (the newest
    `newest`), and of the results store at `store` (a URL), each run once."""
    history = History()
    for path in [*experiments, *(e for root in roots for e in experiments_under(root, newest))]:
        try:
            read_experiment(path, history)
        except CruijffError:  # a folder that only looks like an experiment
            continue
    if store is not None:
        read_store(store, history)
    return history


def read_store(url: str, history: History) -> None:
    """Add the measured runs the results store holds (`cruijff analyze` loads each
    experiment's records there), and its attempts that ran out of memory or time. The
    store keeps one GPU figure per run (its peak), not a count: a run with a GPU peak
    counts as one GPU."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from cruijff.store import ExperimentRow, StageRunRow, TrialRow, open_store

    query = (select(ExperimentRow.path, ExperimentRow.name, TrialRow.trial_id, TrialRow.model,
                    StageRunRow)
             .join(TrialRow, TrialRow.experiment_id == ExperimentRow.id)
             .join(StageRunRow, StageRunRow.trial_pk == TrialRow.id))
    with open_store(url) as store:
        try:
            with store.session(snapshot=True) as session:
                rows = session.execute(query).all()
                for path, name, trial, model, row in rows:
                    history.sources.add(str(path))
                    _add_row(history, str(path), str(name), str(trial), str(model), row)
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise CruijffError(f"cannot read results database {store.url}: {reason}") from None


def _add_row(history: History, path: str, name: str, trial: str, model: str,
             row: Any) -> None:
    try:
        key = model_key(model)
    except CruijffError:
        return
    where = f"{name}/{trial_dir_name(trial)}"
    if row.outcome in FLOORED and (row.requested_mem_mib or row.requested_time_s):
        history.add_limit((path, where, row.stage, "limit", str(row.attempts), row.outcome),
                          Limit(where, key, row.stage, row.outcome, row.requested_mem_mib,
                                row.requested_time_s))
    if row.status != "done" or row.usage_final is not True or row.reused_from \
            or row.wall_s is None:
        return
    throughput = row.throughput if isinstance(row.throughput, dict) else {}
    memory = [m for m in (row.peak_rss_mib, row.sacct_max_rss_mib) if m is not None]
    history.add_run((path, trial, row.stage, row.run_id), Run(
        where, row.stage, model, key, row.finished, float(row.wall_s),
        max(memory) if memory else None,
        _number(throughput.get("train_s", throughput.get("eval_s"))),
        1 if row.gpu_peak_mib else 0, dict(row.size) if isinstance(row.size, dict) else {}))


# ---------------------------------------------------------------------------------------------
# The target: what an experiment's models and stages ask for, and how big their work is


@dataclass
class Demand:
    """One model x stage of an experiment: what its profile asks for, and the largest work
    of its trials (what a suggestion must cover)."""

    model: str
    key: str
    stage: str
    asked: dict[str, Any]
    size: dict[str, float] = field(default_factory=dict)
    trial: str | None = None
    """The trial whose work is the largest."""
    processes: int | None = None
    """A distributed fine-tune's process count (its world size): gres never goes below it."""

    def take(self, trial: str, size: dict[str, float], processes: int | None) -> None:
        """Keep the larger of this and another trial's work."""
        mine, theirs = _work(self.size), _work(size)
        if self.trial is None or (theirs and (not mine or theirs[0] > mine[0])):
            self.size, self.trial = dict(size), trial
        if processes is not None:
            self.processes = max(self.processes or 0, processes)


def add_demand(demands: dict[tuple[str, str], Demand], *, model: str, stage: str, trial: str,
               asked: dict[str, Any], size: dict[str, float],
               processes: int | None = None) -> None:
    key = model_key(model)
    demand = demands.setdefault((key, stage), Demand(model, key, stage, asked))
    demand.take(trial, size, processes)


@dataclass
class Target:
    name: str
    path: Path
    config_path: Path | None
    """The config the experiment was built from (its config.yaml's config_path)."""
    demands: list[Demand]


def read_target(path: Path) -> Target:
    """An experiment's model x stage demands, from its folder."""
    path = path.expanduser().resolve()
    data = experiment_config(path)
    demands: dict[tuple[str, str], Demand] = {}
    for entry in data["trials"]:
        trial_dir = path / trial_dir_name(str(entry["id"]))
        trial = load_yaml_mapping(trial_dir / "config.yaml", f"trial {entry['id']} config")
        sizes = trial.get("sizes") if isinstance(trial.get("sizes"), dict) else {}
        for stage in trial.get("stages") or []:
            add_demand(demands, model=str(trial["model"]), stage=stage, trial=str(entry["id"]),
                       asked=stage_profile_of(trial, stage), size=sizes.get(stage) or {},
                       processes=_processes(trial_dir, stage))
    source = data.get("config_path")
    return Target(str(data["name"]), path, Path(source) if isinstance(source, str) else None,
                  list(demands.values()))


def _processes(trial_dir: Path, stage: str) -> int | None:
    """`cruijff_nproc_per_node` of a distributed fine-tune's config (its world size)."""
    try:
        config = load_yaml_mapping(STAGES[stage].config_path(trial_dir), f"{stage} config")
    except CruijffError:
        return None
    return _int(config.get("cruijff_nproc_per_node"))


# ---------------------------------------------------------------------------------------------
# Suggestions


@dataclass(frozen=True)
class Policy:
    quantile: float = 0.95
    memory_margin: float = 1.25
    time_margin: float = 1.5
    min_runs: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.quantile <= 1:
            raise CruijffError(f"--quantile {self.quantile} must be above 0 and at most 1")
        for name in ("memory_margin", "time_margin"):
            if not getattr(self, name) >= 1:
                raise CruijffError(f"--{name.replace('_', '-')} {getattr(self, name)} must be "
                                   "at least 1 (below it asks for less than runs used)")
        if self.min_runs < 1:
            raise CruijffError(f"--min-runs {self.min_runs} must be at least 1")


@dataclass
class Suggestion:
    model: str
    key: str
    stage: str
    runs: int
    asked: dict[str, Any]
    """The requests the profile makes now (mem GB, time, gres, ...)."""
    mem: int | None = None
    """GB (1024 MiB)."""
    time: str | None = None
    gres: int | None = None
    basis: str | None = None
    notes: list[str] = field(default_factory=list)
    refused: str | None = None
    """Why there is no figure (too few runs)."""

    def changes(self, asked: dict[str, Any] | None = None) -> dict[str, Any]:
        """What --apply writes: each suggested figure that differs from what is asked (by
        default, what the experiment asks now; a typed gres spec keeps its type)."""
        asked = self.asked if asked is None else asked
        found: dict[str, Any] = {}
        if self.mem is not None and asked.get("mem") != self.mem:
            found["mem"] = self.mem
        asked_time = asked.get("time")
        if self.time is not None and (asked_time is None or slurm_seconds(asked_time)
                                      != slurm_seconds(self.time)):
            found["time"] = self.time
        asked_gres = asked.get("gres")
        asked_gpus = gpu_count(asked_gres) if asked_gres is not None else 0
        if self.gres is not None and asked_gpus != self.gres:
            parts = str(asked_gres).split(":")
            typed = asked_gpus is not None and len(parts) >= 2 and not parts[1].isdigit()
            found["gres"] = f"gpu:{parts[1]}:{self.gres}" if typed else self.gres
        return found

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantile(values: list[float], q: float) -> float:
    """numpy's linear quantile (Hyndman & Fan type 7)."""
    import numpy

    return float(numpy.quantile(values, q, method="linear"))


def round_time(seconds: float) -> int:
    """Up to whole 5 minutes, at least 5 minutes."""
    return max(TIME_STEP_S, math.ceil(seconds / TIME_STEP_S - 1e-9) * TIME_STEP_S)


def scaled_time(run: Run, size: dict[str, float]) -> tuple[float, str]:
    """A run's wall time scaled to the work `size`, and how: 'work' (its work time scaled,
    its startup not), 'wall' (no work time reported: the whole wall scaled), or 'none'
    (the sizes are not comparable)."""
    mine, theirs = _work(size), _work(run.size)
    if mine is None or theirs is None or mine[1] != theirs[1] or theirs[0] <= 0:
        return run.wall_s, "none"
    ratio = mine[0] / theirs[0]
    if run.work_s is not None and 0 <= run.work_s <= run.wall_s:
        return run.wall_s - run.work_s + run.work_s * ratio, "work"
    return run.wall_s * ratio, "wall"


def _parameters(value: Any) -> float | None:
    number = _number(value)
    return number if number and number > 0 else None


def _billions(parameters: float) -> str:
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e8 else f"{parameters / 1e6:.2f}M"


def sibling_runs(demand: Demand, history: History) -> tuple[list[Run], float, str] | None:
    """Runs of the nearest size (by parameters) of the demand's lineage, the factor its
    figures scale by, and the sentence that says so; None when there are none."""
    line, target = lineage(demand.model), _parameters(demand.size.get("parameters"))
    if line is None or target is None:
        return None
    members: dict[str, list[Run]] = {}
    for run in history.runs:
        if run.stage == demand.stage and run.key != demand.key and \
                _parameters(run.size.get("parameters")) and lineage(run.model) == line:
            members.setdefault(run.key, []).append(run)
    if not members:
        return None

    def distance(runs: list[Run]) -> float:
        return abs(math.log(target / float(runs[0].size["parameters"])))

    runs = min(members.values(), key=distance)
    source = float(runs[0].size["parameters"])
    factor = target / source
    return runs, factor, (f"from {len(runs)} runs of {runs[0].model}, scaled ×{factor:.2f} by "
                          f"parameters {_billions(source)}→{_billions(target)}")


def suggest(demand: Demand, history: History, policy: Policy) -> Suggestion:
    """The profile one model x stage should ask for, from the history (module docstring)."""
    suggestion = Suggestion(demand.model, demand.key, demand.stage, 0, dict(demand.asked))
    runs, factor = history.of(demand.key, demand.stage), 1.0
    suggestion.basis = f"from {len(runs)} runs of {demand.model}"
    if not runs:
        sibling = sibling_runs(demand, history)
        if sibling is not None:
            runs, factor, suggestion.basis = sibling
    suggestion.runs = len(runs)
    if len(runs) < policy.min_runs:
        suggestion.basis = None
        of = f" of {runs[0].model}" if runs and runs[0].key != demand.key else ""
        suggestion.refused = (f"{len(runs)} run{'s' if len(runs) != 1 else ''} of "
                              f"{demand.stage}{of}, {policy.min_runs} needed")
        return suggestion
    memories = [r.memory_mib * factor for r in runs if r.memory_mib is not None]
    if len(memories) >= policy.min_runs:
        suggestion.mem = max(1, math.ceil(
            round(quantile(memories, policy.quantile) / GIB * policy.memory_margin, 9)))
    else:
        suggestion.notes.append(f"memory: {len(memories)} runs measured it, "
                                f"{policy.min_runs} needed")
    scaled = [scaled_time(r, demand.size) for r in runs]
    time_s = round_time(quantile([s * factor for s, _ in scaled], policy.quantile)
                        * policy.time_margin)
    suggestion.notes += _time_notes(demand, [how for _, how in scaled])
    _apply_floors(suggestion, demand, history, time_s)
    most = max(r.gpus for r in runs)
    if demand.processes and demand.processes > most:
        most = demand.processes
        suggestion.notes.append(f"gres {most}: the fine-tune's world size "
                                "(cruijff_nproc_per_node) needs that many")
    suggestion.gres = most or None
    if not most and demand.asked.get("gres") is not None:
        suggestion.notes.append("no run recorded a GPU in use (gres is left as it is)")
    return suggestion


def _time_notes(demand: Demand, hows: list[str]) -> list[str]:
    work = _work(demand.size)
    notes = []
    if "work" in hows or "wall" in hows:
        notes.append(f"time scaled to trial {demand.trial}'s size by {work[1] if work else '?'}")
    if hows.count("wall"):
        notes.append(f"{hows.count('wall')} runs reported no work time (train_s/eval_s): "
                     "their whole wall time scaled")
    if hows.count("none"):
        notes.append(f"{hows.count('none')} runs not scaled (sizes unknown)")
    return notes


def _apply_floors(suggestion: Suggestion, demand: Demand, history: History,
                  time_s: int) -> None:
    """Never below an out-of-memory/time attempt's request × FLOOR_FACTOR."""
    limits = [x for x in history.limits if x.key == demand.key and x.stage == demand.stage]
    ooms = [x for x in limits if x.outcome == "OUT_OF_MEMORY" and x.mem_mib]
    if ooms and suggestion.mem is not None:
        worst = max(ooms, key=lambda x: x.mem_mib or 0)
        floor = math.ceil(round((worst.mem_mib or 0) / GIB * FLOOR_FACTOR, 9))
        if floor > suggestion.mem:
            suggestion.mem = floor
            suggestion.notes.append(f"mem raised to {floor}G: {worst.where} asked "
                                    f"{(worst.mem_mib or 0) / GIB:g}G and ran OUT_OF_MEMORY")
    timeouts = [x for x in limits if x.outcome == "TIMEOUT" and x.time_s]
    if timeouts:
        worst = max(timeouts, key=lambda x: x.time_s or 0)
        floor = round_time((worst.time_s or 0) * FLOOR_FACTOR)
        if floor > time_s:
            time_s = floor
            suggestion.notes.append(f"time raised to {slurm_time(floor)}: {worst.where} asked "
                                    f"{slurm_time(worst.time_s or 0)} and ran into TIMEOUT")
    suggestion.time = slurm_time(time_s)


def suggest_all(target: Target, history: History, policy: Policy) -> list[Suggestion]:
    return [suggest(d, history, policy) for d in target.demands]


# ---------------------------------------------------------------------------------------------
# Build warnings


def _gib(mib: float) -> str:
    return f"{mib / GIB:.1f}G"


def request_warnings(demands: list[Demand], history: History) -> list[str]:
    """One line per model x stage whose profile asks for less memory or time than the most a
    past run of it used (likely OUT_OF_MEMORY / TIMEOUT), or more than WASTE_FACTOR times
    that (likely waste), naming the run it compares with. Times are scaled to the demand's
    size; asks below the least cruijff suggests (1G, 5 min) count as that least."""
    lines = []
    for demand in demands:
        runs = history.of(demand.key, demand.stage)
        name = f"{demand.key}/{demand.stage}"
        mem, time = demand.asked.get("mem"), demand.asked.get("time")
        measured = [r for r in runs if r.memory_mib is not None]
        if isinstance(mem, int) and measured:
            top = max(measured, key=lambda r: r.memory_mib or 0)
            used = f"{top.where} ({top.day}) used {_gib(top.memory_mib or 0)}"
            if mem * GIB < (top.memory_mib or 0):
                lines.append(f"{name} asks mem {mem}G, but {used}: likely OUT_OF_MEMORY")
            elif mem * GIB > WASTE_FACTOR * max(top.memory_mib or 0, GIB):
                lines.append(f"{name} asks mem {mem}G, over {WASTE_FACTOR}× the most a run "
                             f"used: {used}: likely waste")
        if isinstance(time, str) and runs:
            longest, top = max(((scaled_time(r, demand.size)[0], r) for r in runs),
                               key=lambda pair: pair[0])
            took = (f"{top.where} ({top.day}) took {slurm_time(longest)}"
                    + ("" if longest == top.wall_s else " at this size"))
            if slurm_seconds(time) < longest:
                lines.append(f"{name} asks time {time}, but {took}: likely TIMEOUT")
            elif slurm_seconds(time) > WASTE_FACTOR * max(longest, TIME_STEP_S):
                lines.append(f"{name} asks time {time}, over {WASTE_FACTOR}× the longest a "
                             f"run took: {took}: likely waste")
    return lines


def build_history(root: Path) -> History:
    """What a build compares its profiles with: the newest experiments under its root, and
    the results store when CRUIJFF_DATABASE_URL names one (a store that cannot be read is
    one line in `problems`, never a failed build)."""
    history = gather([], [root], newest=HISTORY_EXPERIMENTS)
    url = os.environ.get("CRUIJFF_DATABASE_URL")
    if url:
        try:
            read_store(url, history)
        except CruijffError as exc:
            history.problems.append(f"results store not read: {exc}")
    return history


# ---------------------------------------------------------------------------------------------
# --apply


def plan_apply(path: Path, suggestions: list[Suggestion]) -> Edit:
    """The config at `path` with each suggestion's figures that differ from what the file
    asks for now set under resources.<key>.stages.<stage> (config_edit.edit_resources)."""

    def wanted(config: ExperimentConfig) -> dict[tuple[str, str], dict[str, Any]]:
        return {(s.key, s.stage): s.changes(config.resources_for(s.key, s.stage).requests())
                for s in suggestions if s.refused is None}

    return edit_resources(path, wanted)
