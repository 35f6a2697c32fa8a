"""What a stage is: one file each (finetune.py, prompt_opt.py, eval.py), registered in
cruijff/registry.py; the pipeline says which run, in which order.

A stage turns a trial into a config file and the command that runs it (the flow and the
generated `.slurm` scripts run that same command), checks what the command produced, and owns
the facts about its outputs that the rest of cruijff asks for: whether trials with equal keys
share one run, the folders it writes into, its headline metrics, its training losses. Adding
a stage is one new file plus its line in the registry (or, from another package, an entry
point in the `cruijff.stages` group).
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cruijff.errors import CruijffError, did_you_mean
from cruijff.fileio import type_name
from cruijff.models import Family
from cruijff.plan import TrialSpec
from cruijff.registry import DEFAULT_PIPELINE, STAGES, file_stem
from cruijff.settings import ExperimentConfig, SplitNames
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
    _resolved: dict[str, StageConfig] = field(default_factory=dict, compare=False, repr=False)

    def resolve(self, stage: Stage) -> StageConfig:
        """`stage`'s config for this trial, resolved once: another stage may read it (eval
        reads the fine-tune's tokenizer), and a 1,000-trial build resolved each twice."""
        if stage.name not in self._resolved:
            self._resolved[stage.name] = stage.resolve(self)
        return self._resolved[stage.name]


class StageFailed(Exception):
    """The stage ran, but its outputs are missing or not what they must be."""


@dataclass(frozen=True)
class Verified:
    """What a finished stage produced: output paths (relative to the trial) and metrics."""

    outputs: list[str]
    metrics: dict[str, Any]
    throughput: dict[str, float] = field(default_factory=dict)
    """What the run got through and how fast (see state.Usage.throughput)."""


@dataclass(frozen=True)
class StageConfig:
    """A resolved stage: the config written to `<stage>.yaml` and the command that runs it
    (what `Stage.command` derives from that config: a build refuses a stage whose resolve
    says otherwise)."""

    data: dict[str, Any]
    command: list[str]


@dataclass(frozen=True)
class Headline:
    """A metric a stage's record carries that tables show per trial (run, --json)."""

    column: str
    """The table's column and, with spaces as _, the --json key: 'accuracy', 'final loss'."""
    metric: str
    """The key in the stage record's metrics: 'accuracy', 'loss_last'."""
    format: str
    """How a table shows it: '.3f'."""
    named_by: str | None = None
    """For a metric the user picks (eval.metric): the key in the record's metrics naming it
    ('headline': 'match/accuracy'), and `<named_by>_default` whether it is the default; tables
    say which it is."""
    fallback: str | None = None
    """The metric that records written before `named_by` existed carry instead."""

    @property
    def key(self) -> str:
        return self.column.replace(" ", "_")


class Stage(ABC):
    name: ClassVar[str]
    """Also the namespace of its design keys ('<name>.*'), and its file names."""
    backend: ClassVar[str]
    """The distribution doing the work; its version is part of the stage key."""
    shared: ClassVar[bool] = False
    """Trials whose keys for this stage are equal run it once: the first runs it, the others
    link its `folders` and record the reuse."""
    folders: ClassVar[tuple[str, ...]] = ()
    """Folders of the trial (relative) this stage writes its outputs into: made at build,
    linked to the owner's where the run is shared, made again after --force moves them."""
    headlines: ClassVar[tuple[Headline, ...]] = ()
    scores: ClassVar[bool] = False
    """Its run's first output is an Inspect log whose per-sample scores `analyze` reads."""
    verify_imports: ClassVar[tuple[str, ...]] = ()
    """Modules `verify` imports: a run imports them while the stage runs, so a slow first
    import (inspect_ai: ~1 s) does not sit between the stage's end and the next stage."""

    @property
    def namespace(self) -> str:
        return self.name

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

    def command(self, trial_dir: Path, config: dict[str, Any], model: str) -> list[str]:
        """The command that runs this stage of a trial (of `model`), derived from its config
        (as resolved, or as read back from `<stage>.yaml`). The build writes it into the
        `.slurm` script, and a run derives it again instead of reading it back from the
        experiment's files: a command is never data. Default: `cruijff exec <stage> <config>`,
        which calls `execute`."""
        return [sys.executable, "-m", "cruijff", "exec", self.name,
                str(self.config_path(trial_dir))]

    def output_paths(self, trial_dir: Path, config: dict[str, Any]) -> dict[str, Path]:
        """Where a run writes, as its config names it: the config key (dotted) -> the path.
        A run refuses to start a stage one of which leads outside its trial folder (an edited
        `<stage>.yaml`). Default: each of `artifacts()`, under the key that holds it."""
        keys = {value: key for key, value in string_values(config)}
        return {keys.get(str(path), f"output {i + 1}"): Path(path)
                for i, path in enumerate(self.artifacts(trial_dir, config))}

    def execute(self, config_path: Path) -> int:
        """Run the stage in this process (for stages whose command is `cruijff exec`)."""
        raise CruijffError(f"stage {self.name} is run by its own command, not `cruijff exec`")

    def losses(self, trial_dir: Path, config: dict[str, Any]) -> list[float]:
        """The training loss per step of this trial's run, for stages that train."""
        return []

    def check_data(self, trial: TrialSpec, data_path: Path, splits: SplitNames) -> None:
        """At build, once the dataset exists: raise CruijffError (naming the file, what is
        wrong and the fix) if this stage could not read it (`splits`: the config's names for
        cruijff's split roles). Stages that leave reading it to
        the task's own code (in whatever format its data_ext names) check nothing."""
        return None

    def config_path(self, trial_dir: Path) -> Path:
        return trial_dir / f"{file_stem(self.name)}.yaml"

    def overrides(self, trial: TrialSpec) -> dict[str, Any]:
        prefix = f"{self.namespace}."
        return {k[len(prefix):]: v for k, v in trial.settings.items() if k.startswith(prefix)}


def string_values(config: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) for every string value in a config, at any depth."""
    if isinstance(config, dict):
        return [pair for key, value in config.items()
                for pair in string_values(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), config)] if isinstance(config, str) else []


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


def pipeline_stages(names: list[str]) -> list[Stage]:
    """The stages a pipeline names, in its order; an unknown or repeated name is an error."""
    if not names:
        raise CruijffError("pipeline is empty: name at least one stage, such as "
                           f"[{', '.join(DEFAULT_PIPELINE)}]")
    stages = []
    for name in names:
        if names.count(name) > 1:
            raise CruijffError(f"pipeline: stage {name!r} is named twice")
        try:
            stages.append(STAGES[name])
        except CruijffError as exc:
            raise CruijffError(f"pipeline: {exc}") from None
    return stages
