"""Stages: one file each, registered here; the pipeline says which run, in which order.

A stage turns a trial into a config file and the command that runs it; the flow and the
generated `.slurm` scripts run that same command. Adding a stage is one new file plus a
registry line below, or, from another package, an entry point in the `cruijff.stages` group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from cruijff.design import TrialSpec
from cruijff.errors import CruijffError, did_you_mean
from cruijff.fileio import type_name
from cruijff.models import Family
from cruijff.settings import ExperimentConfig
from cruijff.tasks import TaskModule


@dataclass(frozen=True)
class TrialContext:
    """Everything a stage needs to resolve its config for one trial."""

    config: ExperimentConfig
    task: TaskModule
    trial: TrialSpec
    trial_dir: Path
    model_path: Path
    data_path: Path
    family: Family | None


class StageFailed(Exception):
    """The stage ran, but its outputs are missing or not what they must be."""


@dataclass(frozen=True)
class Verified:
    """What a finished stage produced: output paths (relative to the trial) and metrics."""

    outputs: list[str]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class StageConfig:
    """A resolved stage: the config written to `<stage>.yaml` and the command that runs it."""

    data: dict[str, Any]
    command: list[str]


class Stage(ABC):
    name: ClassVar[str]
    namespace: ClassVar[str]
    """Design keys '<namespace>.*' are applied to this stage's config."""
    backend: ClassVar[str]
    """The distribution doing the work; its version is part of the stage key."""

    @abstractmethod
    def enabled(self, trial: TrialSpec) -> bool: ...

    @abstractmethod
    def resolve(self, ctx: TrialContext) -> StageConfig:
        """Default config, then environment paths, then the trial's controls and treatment."""

    @abstractmethod
    def verify(self, trial_dir: Path, config: dict[str, Any]) -> Verified:
        """Check the outputs of a finished run; raise StageFailed if they are not right."""

    @abstractmethod
    def artifacts(self, trial_dir: Path, config: dict[str, Any]) -> list[Path]:
        """Everything a run of this stage writes (moved to the archive by --force)."""

    def execute(self, config_path: Path) -> int:
        """Run the stage in this process (for stages whose command is `cruijff exec`)."""
        raise CruijffError(f"stage {self.name} is run by its own command, not `cruijff exec`")

    def config_path(self, trial_dir: Path) -> Path:
        return trial_dir / f"{self.name}.yaml"

    def overrides(self, trial: TrialSpec) -> dict[str, Any]:
        prefix = f"{self.namespace}."
        return {k[len(prefix):]: v for k, v in trial.settings.items() if k.startswith(prefix)}


def _compatible(old: Any, new: Any) -> bool:
    """May `new` replace `old` in a config? Same kind of value; ints may stand for floats."""
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, float):
        return isinstance(new, int | float)
    for kind in (int, str, list, dict):
        if isinstance(old, kind):
            return isinstance(new, kind)
    return True


def set_existing(config: dict[str, Any], path: str, value: Any, where: str,
                 namespace: str = "") -> None:
    """Set a dotted key that must already exist in `config`, with a value of its type.
    Errors show the key as the user wrote it: `namespace.path`."""
    parts = path.split(".")
    shown = f"{namespace}.{path}" if namespace else path
    node: Any = config
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            choices = list(node) if isinstance(node, dict) else []
            prefix = ".".join(parts[:depth])
            inside = f" under '{prefix}'" if prefix else ""
            raise CruijffError(
                f"key '{shown}': the {where} has no '{part}'{inside}{did_you_mean(part, choices)}"
            )
        if depth == len(parts) - 1:
            if not _compatible(node[part], value):
                raise CruijffError(
                    f"key '{shown}': the {where} expects {type_name(node[part])} "
                    f"(like {node[part]!r}), got {value!r}"
                )
            node[part] = value
        else:
            node = node[part]


def set_path(config: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted key, creating mappings on the way (for cruijff's own fill-ins)."""
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


_REGISTERED: dict[str, Stage] = {}


def register(cls: type[Stage]) -> type[Stage]:
    _REGISTERED[cls.name] = cls()
    return cls


from cruijff.stages import eval as eval_stage  # noqa: E402, F401
from cruijff.stages import finetune, prompt_opt  # noqa: E402, F401

PIPELINE = ("finetune", "prompt_opt", "eval")
"""The default pipeline, in order (the experiment config's `pipeline` may choose others)."""


def _load_plugins() -> None:
    """Stages other packages register through the `cruijff.stages` entry point group."""
    for entry in entry_points(group="cruijff.stages"):
        if entry.name in _REGISTERED:
            continue
        try:
            cls = entry.load()
        except Exception as exc:  # a broken plugin must not hide which one it is
            raise CruijffError(f"stage plugin {entry.name!r} ({entry.value}) failed to load: "
                               f"{exc}") from None
        register(cls)


_load_plugins()
STAGES: dict[str, Stage] = {**{name: _REGISTERED[name] for name in PIPELINE}, **_REGISTERED}
"""Every registered stage by name: the default pipeline's first, in order."""


def pipeline_stages(names: list[str]) -> list[Stage]:
    """The stages a pipeline names, in its order; an unknown or repeated name is an error."""
    if not names:
        raise CruijffError("pipeline is empty: name at least one stage, such as "
                           f"[{', '.join(PIPELINE)}]")
    for name in names:
        if name not in STAGES:
            raise CruijffError(f"pipeline: unknown stage {name!r}{did_you_mean(name, STAGES)}; "
                               f"registered stages: {', '.join(STAGES)}")
        if names.count(name) > 1:
            raise CruijffError(f"pipeline: stage {name!r} is named twice")
    return [STAGES[name] for name in names]
