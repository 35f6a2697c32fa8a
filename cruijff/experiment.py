"""The experiment directory: building it from a config and a design.

A build validates everything first (config, task, design, every stage config), then prepares
missing data and models, then writes the whole experiment into a temporary folder that is
renamed into place: a failed build leaves no experiment behind, and `--force` moves the old one
into `<root>/.archive/` instead of deleting it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cruijff import __version__
from cruijff.design import Design, Plan, TrialSpec, expand
from cruijff.errors import CruijffError
from cruijff.fileio import dump_yaml, load_yaml_mapping
from cruijff.models import ensure_model, family_of, model_key
from cruijff.settings import CruijffSettings, ExperimentConfig
from cruijff.slurm import render_script
from cruijff.stages import STAGES, TrialContext
from cruijff.tasks import TaskModule, load_task

EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ARCHIVE = ".archive"


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


def validate_experiment_name(name: str) -> str:
    if not EXPERIMENT_NAME.match(name) or ".." in name:
        raise CruijffError(
            f"experiment name {name!r} must start with a letter or digit and use only "
            "letters, digits and _ . - (at most 100 characters)"
        )
    return name


def trial_dir_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def experiment_config(path: Path) -> dict[str, Any]:
    """The resolved config.yaml of an experiment folder written by `cruijff build`."""
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise CruijffError(f"{path} is not a cruijff experiment (no config.yaml): "
                           "build one with `cruijff build`")
    data = load_yaml_mapping(config_file, "experiment config")
    if "trials" not in data or "name" not in data:
        raise CruijffError(f"{config_file} is not an experiment config written by cruijff build")
    return data


def build_experiment(request: BuildRequest, *, dry_run: bool = False, force: bool = False,
                     settings: CruijffSettings | None = None) -> Built:
    settings = settings or CruijffSettings()
    config = ExperimentConfig.load(request.config_path)
    task = load_task(config.tasks_dir, request.task)
    plan = expand(request.design, config)
    _check_used(plan.trials, request.design.controls)
    name = validate_experiment_name(
        request.name or f"{task.name}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    root = request.root.resolve()
    dest = root / name
    if dest.exists() and not force and not dry_run:
        raise CruijffError(
            f"experiment {dest} already exists: pass --force to move it into "
            f"{root / ARCHIVE} and build again, or choose another --name"
        )

    if not dry_run:
        for dataset in dict.fromkeys(t.dataset for t in plan.trials):
            task.build_dataset(dataset, config.data_dir)
        for model in dict.fromkeys(t.model for t in plan.trials):
            ensure_model(model, config.model_dir, settings)

    files: dict[str, str] = {}
    stages: dict[str, list[str]] = {}
    for trial in plan.trials:
        stages[trial.id] = _render_trial(files, trial, config, task, dest, name)
    files["config.yaml"] = dump_yaml({
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
    built = Built(name, dest, plan, config, stages)
    if dry_run:
        return built
    built.archived = _write(root, dest, files, force)
    _copy_root_config(request.config_path.resolve(), root)
    return built


def _render_trial(files: dict[str, str], trial: TrialSpec, config: ExperimentConfig,
                  task: TaskModule, dest: Path, name: str) -> list[str]:
    """Add one trial's files (relative path -> text) and return its enabled stage names."""
    folder = trial_dir_name(trial.id)
    trial_dir = dest / folder
    ctx = TrialContext(
        config=config,
        task=task,
        trial=trial,
        trial_dir=trial_dir,
        model_path=config.model_dir / model_key(trial.model),
        data_path=config.data_dir / trial.dataset,
        family=family_of(trial.model),
    )
    resources = config.resources_for(model_key(trial.model))
    enabled = [stage for stage in STAGES.values() if stage.enabled(trial)]
    commands = {}
    for stage in enabled:
        resolved = stage.resolve(ctx)
        commands[stage.name] = resolved.command
        files[f"{folder}/{stage.name}.yaml"] = dump_yaml(resolved.data)
        files[f"{folder}/{stage.name}.slurm"] = render_script(
            job_name=f"cruijff-{name}-{trial.id}-{stage.name}",
            resources=resources,
            command=resolved.command,
            workdir=trial_dir,
            log_file=trial_dir / "logs" / f"{stage.name}-%j.out",
            description=f"experiment {name}, trial {trial.id} ({trial.label}), stage {stage.name}",
        )
    files[f"{folder}/config.yaml"] = dump_yaml({
        **trial.to_dict(),
        "label": trial.label,
        "experiment": name,
        "task": task.name,
        "model_path": str(ctx.model_path),
        "data_path": str(ctx.data_path),
        "resources": resources.model_dump(exclude_none=True),
        "stages": [s.name for s in enabled],
        "commands": commands,
    })
    return [s.name for s in enabled]


def _check_used(trials: list[TrialSpec], controls: dict[str, Any]) -> None:
    """A stage key that no trial it applies to uses would be silently ignored: refuse it.
    A treatment's keys must be used by its own trials; a control's by at least one trial."""
    namespaces = {stage.namespace for stage in STAGES.values()}

    def runs(trial: TrialSpec, namespace: str) -> bool:
        return any(s.namespace == namespace and s.enabled(trial) for s in STAGES.values())

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


def _write(root: Path, dest: Path, files: dict[str, str], force: bool) -> Path | None:
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=root))
    try:
        for relative, text in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        for relative in files:
            if relative.endswith(".slurm"):
                (staging / relative).chmod(0o755)
                (staging / relative).parent.joinpath("logs").mkdir(exist_ok=True)
            if relative.endswith("finetune.yaml"):
                (staging / relative).parent.joinpath("checkpoints").mkdir(exist_ok=True)
        archived = None
        if dest.exists() and force:
            archived = root / ARCHIVE / f"{dest.name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
            archived.parent.mkdir(parents=True, exist_ok=True)
            dest.rename(archived)
        staging.rename(dest)
        return archived
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _copy_root_config(config_path: Path, root: Path) -> None:
    """The spec's layout keeps the experiment config at the root, beside the experiments."""
    target = root / "config.yaml"
    if not target.exists():
        shutil.copyfile(config_path, target)


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
         "control": t.control, "stages": built.stages[t.id]}
        for t in built.plan.trials
    ]
