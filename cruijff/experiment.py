"""The experiment directory: building it from a config and a design.

A build validates everything first (config, task, design, every stage config), then prepares
missing data and models, then writes the whole experiment into a temporary folder that is
renamed into place: a failed build leaves no experiment behind, and `--force` moves the old one
into `<root>/.archive/` instead of deleting it.

A build holds an flock on `<root>/.<name>.build.lock` from its existence check to the rename:
a second build of the same name is refused instead of racing it (both renames, or archiving
the winner's folder). `--force` also holds the experiment's run lock while it moves the old
folder, so it never archives an experiment from under a `cruijff run`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from cruijff import __version__
from cruijff.design import Design, expand
from cruijff.errors import CruijffError
from cruijff.fileio import dump_yaml, load_yaml_mapping, lock_within, umask
from cruijff.models import (
    ensure_model,
    family_of,
    is_local,
    model_folder,
    model_key,
    parameter_count,
)
from cruijff.parse_cache import PARSED_CONFIGS, BuiltFiles
from cruijff.plan import Plan, TrialSpec
from cruijff.registry import STAGES, file_stem
from cruijff.settings import (
    CruijffSettings,
    ExperimentConfig,
    ResourceProfile,
    describe_validation_error,
)
from cruijff.slurm import render_script, stage_job_command
from cruijff.splits import check_trial
from cruijff.stages import Stage, TrialContext, pipeline_stages
from cruijff.state import RECORDS, now
from cruijff.tasks import TaskModule, load_task

EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ARCHIVE = ".archive"
REPORT_DIR = "report"
"""Where `analyze` writes the report in an experiment (the run's artifacts link it)."""


@dataclass
class BuildRequest:
    config_path: Path
    task: str
    design: Design
    root: Path
    name: str | None = None


@dataclass
class Built:
    """The outcome of a build (or of a dry run, where `path` was not written)."""

    name: str
    path: Path
    plan: Plan
    config: ExperimentConfig
    stages: dict[str, list[str]]
    """Trial id -> names of its enabled stages."""
    archived: Path | None = None
    profiles: dict[str, dict[str, ResourceProfile]] = field(default_factory=dict)
    """Trial id -> stage -> what that stage asks Slurm for."""
    sizes: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Trial id -> stage -> the size of its work (compute.stage_size)."""
    warnings: list[str] = field(default_factory=list)
    """Profiles that ask for much less or much more than past runs used, and splits cruijff
    cannot check (one line each)."""
    splits: dict[str, dict[str, dict[str, str | None]]] = field(default_factory=dict)
    """Trial id -> stage -> what it reads -> the dataset split (None: the task chooses)."""


def validate_experiment_name(name: str) -> str:
    if not EXPERIMENT_NAME.fullmatch(name) or ".." in name:
        raise CruijffError(
            f"experiment name {name!r} must start with a letter or digit and use only "
            "letters, digits and _ . - (at most 100 characters)"
        )
    return name


def trial_dir_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def experiment_config(path: Path, read: Callable[[Path, str], dict[str, Any]] = load_yaml_mapping
                      ) -> dict[str, Any]:
    """The resolved config.yaml of an experiment folder written by `cruijff build` (`read`:
    how a YAML mapping is read, e.g. through a cache)."""
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise CruijffError(f"{path} is not a cruijff experiment (no config.yaml): "
                           "build one with `cruijff build`")
    data = read(config_file, "experiment config")
    if "trials" not in data or "name" not in data:
        raise CruijffError(f"{config_file} is not an experiment config written by cruijff build")
    return data


def stage_profile_of(trial_config: dict[str, Any], stage: str) -> dict[str, Any]:
    """What one stage of a trial asks Slurm for, from the trial's config.yaml: its entry in
    `stage_resources`, else `resources` (the trial's worker profile: an experiment built
    before per-stage profiles, or one whose stages all ask for the same)."""
    own = (trial_config.get("stage_resources") or {}).get(stage)
    profile = own if isinstance(own, dict) else trial_config.get("resources")
    return dict(profile) if isinstance(profile, dict) else {}


def trial_stage_profile(trial_dir: Path, stage: str) -> ResourceProfile:
    """stage_profile_of a trial folder's config.yaml, checked like the experiment config."""
    from pydantic import ValidationError

    config = trial_dir / "config.yaml"
    try:
        return ResourceProfile(**stage_profile_of(load_yaml_mapping(config, "trial config"),
                                                  stage))
    except ValidationError as exc:
        why = describe_validation_error(exc, ResourceProfile).removeprefix(": ")
        raise CruijffError(f"{config}: resources of stage {stage}: {why}") from None


def build_experiment(request: BuildRequest, *, dry_run: bool = False, force: bool = False,
                     settings: CruijffSettings | None = None) -> Built:
    settings = settings or CruijffSettings()
    config = ExperimentConfig.load(request.config_path)
    task = load_task(config.tasks_dir, request.task)
    plan = expand(request.design, config, request.config_path.expanduser().resolve().parent)
    _check_used(plan.trials, request.design.controls, pipeline_stages(config.pipeline))
    name = validate_experiment_name(
        request.name or f"{task.name}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    # a local model folder that is not one is refused before anything is prepared
    model_paths = {m: model_folder(m, config.model_dir) for m in dict.fromkeys(
        t.model for t in plan.trials)}
    root = _experiment_root(request.root, probe=not dry_run)
    dest = root / name
    if dry_run:
        return _warned(_render(request, config, task, plan, dest, model_paths)[0], root)
    with _build_lock(root, name):
        if dest.exists() and not force:
            raise CruijffError(
                f"experiment {dest} already exists: pass --force to move it into "
                f"{root / ARCHIVE} and build again, or choose another --name"
            )
        if dest.exists():
            with _holding_run_lock(dest, name):  # refuse now, before preparing data and models
                pass
        for dataset in dict.fromkeys(t.dataset for t in plan.trials):
            task.build_dataset(dataset, config.data_dir)
        _check_data(plan.trials, config)
        for model in model_paths:
            if not is_local(model):
                model_paths[model] = ensure_model(model, config.model_dir, settings)
        built, files = _render(request, config, task, plan, dest, model_paths)
        folders = [f"{trial_dir_name(trial_id)}/{folder}"
                   for trial_id, names in built.stages.items()
                   for name in names for folder in STAGES[name].folders]
        _warned(built, root)  # before the old experiment is archived: it is history too
        built.archived = _write(root, dest, files, folders, force)
        _copy_root_config(request.config_path.resolve(), root)
    return built


def _warned(built: Built, root: Path) -> Built:
    """Add warnings for profiles that ask for far less or far more than past runs of the
    same model and stage used (compute.request_warnings), when any asks for mem or time."""
    from cruijff.compute import add_demand, build_history, request_warnings

    demands: dict[tuple[str, str], Any] = {}
    for trial in built.plan.trials:
        for stage, profile in built.profiles.get(trial.id, {}).items():
            add_demand(demands, model=trial.model, stage=stage, trial=trial.id,
                       asked=profile.requests(), size=built.sizes[trial.id].get(stage, {}))
    if not any("mem" in d.asked or "time" in d.asked for d in demands.values()):
        return built
    history = build_history(root)
    built.warnings = [*built.warnings, *history.problems,
                      *request_warnings(list(demands.values()), history)]
    return built


def _experiment_root(given: Path, *, probe: bool) -> Path:
    """--root, resolved: a folder, or a path where one can be made. `probe`: make and remove
    a folder in it (or in its nearest existing parent) to be sure, so that a root on a file
    system that holds no folders (/proc) is refused before anything is prepared."""
    root = given.resolve()
    base = next(p for p in (root, *root.parents) if p.exists())
    if not base.is_dir():
        raise CruijffError(f"--root {given}: {base} is not a folder: choose a folder for the "
                           "experiment (one that does not exist yet is made)")
    if probe:
        try:
            Path(tempfile.mkdtemp(prefix=".cruijff-root-check-", dir=base)).rmdir()
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                 errno.EDQUOT):  # those: the build's own write says so
                raise CruijffError(f"--root {given}: cannot make a folder in {base} "
                                   f"({exc.strerror}): choose a folder on an ordinary file "
                                   "system") from None
    return root


def _check_data(trials: list[TrialSpec], config: ExperimentConfig) -> None:
    """Each stage a trial runs checks the dataset file it reads itself (the fine-tune: its
    'train' records), so a file it could not read is refused now, not by a failing run."""
    stages = pipeline_stages(config.pipeline)
    for trial in sorted(trials, key=lambda t: t.dataset):
        for stage in stages:
            if stage.enabled(trial):
                stage.check_data(trial, config.data_dir / trial.dataset, config.splits)


def _render(request: BuildRequest, config: ExperimentConfig, task: TaskModule, plan: Plan,
            dest: Path, model_paths: dict[str, Path]) -> tuple[Built, dict[str, str]]:
    """The experiment's files (relative path -> text), rendered for the folder `dest`, with
    each model's folder from `model_paths`."""
    name = dest.name
    files = BuiltFiles()
    stages: dict[str, list[str]] = {}
    profiles: dict[str, dict[str, ResourceProfile]] = {}
    sizes: dict[str, dict[str, dict[str, float]]] = {}
    splits: dict[str, dict[str, dict[str, str | None]]] = {}
    warnings: list[str] = []
    parameters = {model: parameter_count(path) for model, path in model_paths.items()}
    for trial in plan.trials:
        profiles[trial.id], sizes[trial.id] = _render_trial(
            files, trial, config, task, dest, name, model_paths[trial.model],
            parameters[trial.model], splits, warnings)
        stages[trial.id] = list(profiles[trial.id])
    files.add_mapping("config.yaml", {
        "name": name,
        "task": task.name,
        "created": datetime.now().isoformat(timespec="seconds"),
        "cruijff_version": __version__,
        "config_path": str(request.config_path.resolve()),
        "config": config.to_yaml_dict(),
        "design": request.design.to_dict(),
        "notices": plan.notices,
        "trials": [{**t.to_dict(), "label": t.label, "stages": stages[t.id]} for t in plan.trials],
    })
    files[f"{RECORDS}/{PARSED_CONFIGS}"] = files.cache_text()
    return Built(name, dest, plan, config, stages, profiles=profiles, sizes=sizes,
                 warnings=warnings, splits=splits), files


def _render_trial(files: BuiltFiles, trial: TrialSpec, config: ExperimentConfig,
                  task: TaskModule, dest: Path, name: str, model_path: Path,
                  parameters: int | None,
                  splits: dict[str, dict[str, dict[str, str | None]]], warnings: list[str],
                  ) -> tuple[dict[str, ResourceProfile], dict[str, dict[str, float]]]:
    """Add one trial's files (relative path -> text); return each enabled stage's resource
    profile and work size, in pipeline order; add what its stages read to `splits`, after
    checking them (cruijff/splits.py; a split it cannot check goes to `warnings`). Each
    `<stage>.slurm` asks for its stage's profile; the trial's `resources` (what its worker
    jobs ask for) is the most any of its stages asks for, and `stage_resources` each stage's
    own where they differ."""
    from cruijff.compute import stage_size

    folder = trial_dir_name(trial.id)
    trial_dir = dest / folder
    ctx = TrialContext(
        config=config,
        task=task,
        trial=trial,
        trial_dir=trial_dir,
        model_path=model_path,
        data_path=config.data_dir / trial.dataset,
        family=family_of(trial.model),
    )
    key = model_key(trial.model)
    enabled = [stage for stage in pipeline_stages(config.pipeline) if stage.enabled(trial)]
    profiles = {stage.name: config.resources_for(key, stage.name) for stage in enabled}
    worker = config.worker_profile(key, list(profiles))
    sizes: dict[str, dict[str, float]] = {}
    commands = {}
    resolved_all = {stage.name: ctx.resolve(stage) for stage in enabled}
    reads = splits[trial.id] = check_trial(
        trial.id, trial.dataset, ctx.data_path,
        {stage: r.data for stage, r in resolved_all.items()}, warnings)
    for stage in enabled:
        resolved = resolved_all[stage.name]
        command = stage.command(trial_dir, resolved.data, trial.model)
        if resolved.command != command:  # a run derives it again: never two commands
            raise CruijffError(
                f"stage {stage.name}: resolve() gives the command {resolved.command} but "
                f"command() derives {command} from the same config: a stage's command must "
                "come from its command() (cruijff derives it again when it runs the stage)")
        commands[stage.name] = command  # documentation: a run never reads it back
        sizes[stage.name] = stage_size(stage.name, resolved.data, parameters)
        stem = file_stem(stage.name)
        render = getattr(resolved, "render", None)  # a stage that keeps its template's comments
        files[f"{folder}/{stem}.yaml"] = render() if render else dump_yaml(resolved.data)
        files[f"{folder}/{stem}.slurm"] = render_script(
            job_name=f"cruijff-{name}-{trial.id}-{stage.name}",
            resources=profiles[stage.name],
            command=stage_job_command(trial_dir, stage.name),
            workdir=trial_dir,
            log_file=trial_dir / "logs" / f"{stem}-%j.out",
            description=f"experiment {name}, trial {trial.id} ({trial.label}), stage {stage.name}",
            prologue=config.slurm.prologue,
            stage_command=command,
        )
    files.add_mapping(f"{folder}/config.yaml", {
        **trial.to_dict(),
        "label": trial.label,
        "experiment": name,
        "task": task.name,
        "model_path": str(ctx.model_path),
        "data_path": str(ctx.data_path),
        "resources": worker.requests(),
        **({"stage_resources": {s: p.requests() for s, p in profiles.items()}}
           if any(p.requests() != worker.requests() for p in profiles.values()) else {}),
        "stages": [s.name for s in enabled],
        "commands": commands,
        "splits": reads,
        "sizes": sizes,
    })
    return profiles, sizes


def _check_used(trials: list[TrialSpec], controls: dict[str, Any],
                pipeline: list[Stage]) -> None:
    """A stage key that no trial it applies to uses would be silently ignored: refuse it.
    A treatment's keys must be used by its own trials; a control's by at least one trial."""
    namespaces = set(STAGES.names())
    for key in [*controls, *(k for t in trials for k in t.treatment)]:
        namespace = key.split(".", 1)[0]
        if namespace in namespaces and all(s.namespace != namespace for s in pipeline):
            raise CruijffError(f"key '{key}' is for the {namespace} stage, which the config's "
                               f"pipeline ({', '.join(s.name for s in pipeline)}) does not run")

    def runs(trial: TrialSpec, namespace: str) -> bool:
        return any(s.namespace == namespace and s.enabled(trial) for s in pipeline)

    for trial in trials:
        for key in trial.treatment:
            namespace = key.split(".", 1)[0]
            if namespace in namespaces and not runs(trial, namespace):
                raise CruijffError(
                    f"treatment key '{key}' is set for trial {trial.id}, which does not run the "
                    f"{namespace} stage (use_fine_tune/use_prompt_opt is off)")
    for key in controls:
        namespace = key.split(".", 1)[0]
        if namespace in namespaces and not any(runs(t, namespace) for t in trials):
            raise CruijffError(f"control key '{key}' applies to no trial: none runs the "
                               f"{namespace} stage (use_fine_tune/use_prompt_opt is off)")


def _write(root: Path, dest: Path, files: dict[str, str], folders: list[str],
           force: bool) -> Path | None:
    """Write the files and make the (empty) folders in a staging folder and rename it to
    `dest` (call with the build lock held); with `force`, first move the old `dest` into the
    archive."""
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=root))
    mask = umask()
    staging.chmod(0o777 & ~mask)  # mkdtemp makes it owner-only; colleagues may read results
    try:
        _write_tree(staging, files, folders)
        archived = None
        if dest.exists() and force:
            archived = root / ARCHIVE / f"{dest.name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
            archived.parent.mkdir(parents=True, exist_ok=True)
            with _holding_run_lock(dest, dest.name):
                dest.rename(archived)
        try:
            staging.rename(dest)
        except OSError as exc:  # only something other than cruijff can have made it meanwhile
            raise CruijffError(f"cannot move the built experiment into place at {dest}: "
                               f"{exc.strerror}") from None
        return archived
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_tree(staging: Path, files: dict[str, str], folders: list[str]) -> None:
    """Into the new, empty `staging`: each folder made once, then the files, with the mode
    a plain open() gives them (`.slurm` scripts executable, a `logs` folder beside each).
    Written by a few threads: creating a file is a metadata write the file system serves
    while the next is prepared, most of writing a 1,000-trial build's ~5,000 files."""
    from concurrent.futures import ThreadPoolExecutor

    base = str(staging)
    wanted = {*folders, *(os.path.dirname(r) for r in files),
              *(os.path.join(os.path.dirname(r), "logs") for r in files if r.endswith(".slurm"))}
    for folder in list(wanted):
        while folder := os.path.dirname(folder):
            wanted.add(folder)
    wanted.discard("")
    for folder in sorted(wanted, key=lambda f: f.count("/")):
        os.mkdir(os.path.join(base, folder))

    def put(relative: str) -> None:
        mode = 0o777 if relative.endswith(".slurm") else 0o666  # less the umask
        fd = os.open(os.path.join(base, relative),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with open(fd, "wb") as fh:
            fh.write(files[relative].encode("utf-8"))

    with ThreadPoolExecutor(4) as pool:
        for _ in pool.map(put, files):
            pass


def _lock_holder(handle: IO[str]) -> str:
    """'pid N' (and its host when not this one) from a lock file's content, as run_lock and
    _build_lock write it."""
    handle.seek(0)
    try:
        holder = json.loads(handle.read() or "{}")
        pid, host = holder["pid"], holder.get("host")
    except (ValueError, TypeError, KeyError):
        return "pid unknown"
    return f"pid {pid}" + (f" on {host}" if host and host != os.uname().nodename else "")


@contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    """Hold `<root>/.<name>.build.lock`, or refuse: another build of this name is writing it.
    The OS frees an flock when its process dies; the file is removed when the build ends
    (a killed build leaves it, empty and hidden, for the next build to take over)."""
    missing = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".{name}.build.lock"
    try:
        while True:
            handle = path.open("a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(handle)
                handle.close()
                raise CruijffError(
                    f"experiment {name} is being built by another cruijff ({holder}): wait for "
                    "it, then use that experiment, or build again with --force to replace it"
                ) from None
            try:  # the previous holder may have removed the file we opened: lock the new one
                if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        with handle:
            handle.truncate(0)
            handle.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                     "since": now()}))
            handle.flush()
            _remove_stale_staging(root, name)
            try:
                yield
            finally:
                path.unlink(missing_ok=True)  # before the lock is released, never after
    except BaseException:
        for folder in missing:  # a failed build leaves no new folders either
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _remove_stale_staging(root: Path, name: str) -> None:
    """Staging folders of this name left by a build that was killed (only the holder of the
    build lock writes one, so any that exists now is stale)."""
    stale = re.compile(rf"\.{re.escape(name)}\.building-[A-Za-z0-9_]{{8}}")
    for folder in root.iterdir():
        if stale.fullmatch(folder.name) and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _holding_run_lock(path: Path, name: str) -> Iterator[None]:
    """Hold the experiment's run lock (the one runner.run_lock takes), or refuse: a
    `cruijff run` has it. Held while --force moves the folder, no run can start on it.
    `summary` and `progress` take it for an instant to see whether a run has it: a lock still
    held after fileio.LOCK_PATIENCE_S is a run's."""
    lock = path / RECORDS / "run.lock"
    lock.parent.mkdir(exist_ok=True)
    with lock.open("a+", encoding="utf-8") as handle:
        try:
            lock_within(handle)
        except BlockingIOError:
            raise CruijffError(
                f"experiment {name} is being run by `cruijff run` ({_lock_holder(handle)}): "
                "wait for it to finish or stop it, then build --force again") from None
        yield


def _copy_root_config(config_path: Path, root: Path) -> None:
    """The spec's layout keeps the experiment config at the root, beside the experiments.
    The copy must mean what the original meant where it lands: its relative paths
    (tasks_dir, data_dir, model_dir, finetune_config, eval_config, and their defaults) are
    rewritten relative to the copy, so `cruijff build --config-path <root>/config.yaml`
    finds the same tasks, data and models. A copy already there is the user's: kept."""
    from cruijff.fileio import atomic_write_text

    target = root / "config.yaml"
    if target.exists():
        return
    text = config_path.read_text(encoding="utf-8")
    atomic_write_text(target, relocated_config(text, config_path, root.resolve()))


def _path_fields() -> dict[str, tuple[str, ...]]:
    """ExperimentConfig's path-valued fields: name -> the keys a file may give it by."""
    from pydantic import AliasChoices

    fields: dict[str, tuple[str, ...]] = {}
    for name, info in ExperimentConfig.model_fields.items():
        if info.annotation not in (Path, Path | None):
            continue
        alias = info.validation_alias
        keys = tuple(str(a) for a in alias.choices) if isinstance(alias, AliasChoices) else ()
        fields[name] = tuple(dict.fromkeys((name, *keys)))
    return fields


def _moved(value: str, source: Path, dest: Path) -> str | None:
    """`value` (a path relative to folder `source`) relative to folder `dest`; None when it
    means the same from anywhere (absolute, or under ~). Both folders are resolved, so
    walking up from `dest` is exact; the value itself is kept as written (a symlink in it
    stays a symlink)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return None
    up = os.path.relpath(source, dest)
    return value if up == "." else str(Path(up) / value)


def _yaml_scalar(text: str) -> str:
    import yaml

    plain = re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_./-]*", text) is not None
    return text if plain and yaml.safe_load(text) == text else json.dumps(text)


def relocated_config(text: str, origin: Path, dest: Path) -> str:
    """The text of config file `origin` (resolved), moved to folder `dest`: each relative
    path-valued setting rewritten (in place, so comments and every other key stay as
    written), and path settings the file left to their defaults written out. Should the
    in-place edit not read back as meant, the mapping is written anew (without comments)."""
    import yaml

    data = yaml.safe_load(text) if text.strip() else {}
    if not isinstance(data, dict):
        return text  # not a config the build could have read; copied as it is
    moves = _path_moves(data, origin.parent, dest)
    edited = _edited_in_place(text, moves)
    try:
        ok = edited is not None and yaml.safe_load(edited) == {**data, **moves}
    except yaml.YAMLError:
        ok = False
    if edited is None or not ok:
        edited = dump_yaml({**data, **moves})
    shown = str(origin) if str(origin).isprintable() else "the experiment's config"
    return (f"# copied by `cruijff build` from {shown}; its relative paths rewritten to "
            "point where the original's do\n") + edited


def _path_moves(data: dict[str, Any], source: Path, dest: Path) -> dict[str, str]:
    """The key -> new value of each path setting that means something else from `dest`
    (a default the file leaves out is added under the field's own name)."""
    moves: dict[str, str] = {}
    for name, keys in _path_fields().items():
        key = next((k for k in keys if k in data), None)
        value = data.get(key) if key else ExperimentConfig.model_fields[name].default
        if isinstance(value, str | Path):
            moved = _moved(str(value), source, dest)
            if moved is not None or key is None:
                moves[key or name] = moved or str(value)
    return moves


def _edited_in_place(text: str, moves: dict[str, str]) -> str | None:
    """`text` with the values of `moves` replaced where they stand and the missing keys
    added at the mapping's end; None where the text's shape is not one this handles."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader) if text.strip() else None
    except yaml.YAMLError:
        return None
    if node is not None and not isinstance(node, yaml.MappingNode):
        return None
    entries = {k.value: v for k, v in (node.value if node else [])
               if isinstance(k, yaml.ScalarNode)}
    edits: list[tuple[int, int, str]] = []
    for key, value in moves.items():
        if key in entries:
            where = entries[key]
            edits.append((where.start_mark.index, where.end_mark.index, _yaml_scalar(value)))
    added = [f"{key}: {_yaml_scalar(value)}" for key, value in moves.items()
             if key not in entries]
    if added and node is not None and node.flow_style:
        at = node.end_mark.index - 1  # before the closing brace
        edits.append((at, at, (", " if node.value else "") + ", ".join(added)))
    elif added:
        at = node.end_mark.index if node is not None else len(text)
        indent = " " * (node.value[0][0].start_mark.column if node and node.value else 0)
        lead = "" if at == 0 or text[at - 1] == "\n" else "\n"
        edits.append((at, at, lead + "".join(f"{indent}{line}\n" for line in added)))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def matching_experiment(request: BuildRequest) -> Path | None:
    """The experiment this request names, if it was built from the same config, task and
    design (so `cruijff run` with build options can simply continue it)."""
    if request.name is None:
        return None
    path = request.root.resolve() / request.name
    try:
        built = load_yaml_mapping(path / "config.yaml", "experiment config")
    except CruijffError:
        return None
    same = (built.get("task") == request.task
            and built.get("config_path") == str(request.config_path.resolve())
            and built.get("design") == request.design.to_dict())
    return path if same else None


def trial_rows(built: Built) -> list[dict[str, Any]]:
    """One row per trial, for tables and --json."""
    return [
        {"id": t.id, "model": t.model, "dataset": t.dataset, "label": t.label,
         "control": t.control, "stages": built.stages[t.id],
         "splits": built.splits.get(t.id, {})}
        for t in built.plan.trials
    ]
