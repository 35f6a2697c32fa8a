"""Fine-tuning with torchtune: torchtune's recipe for the model, run by cruijff's launcher
(`python -m cruijff.recipes.run <recipe> --config finetune.yaml`, under `torchrun` for a
distributed one) so that cruijff reads the losses whatever metric logger the config picks."""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cruijff.adapters import checkpoint_shape
from cruijff.components import check_components, named_components
from cruijff.errors import CruijffError
from cruijff.fileio import dump_yaml, load_yaml_mapping
from cruijff.metric_capture import CAPTURE_FILE, CAPTURE_KEY
from cruijff.models import checkpoint_files, family_of, model_key, torchtune_config_path
from cruijff.plan import TrialSpec
from cruijff.settings import ResourceProfile, SplitNames
from cruijff.stages import (
    Headline,
    Stage,
    StageConfig,
    StageFailed,
    TrialContext,
    Verified,
    set_existing,
    set_path,
    string_values,
)

CHECKPOINTS = "checkpoints"
FINAL_CHECKPOINT = f"{CHECKPOINTS}/final"
"""Where a trial's fine-tuned model ends up (relative to the trial folder)."""
LOG_DIR = "logs/finetune"
"""Where torchtune's metric logger writes (relative to the trial folder)."""


def dataset_section(data_path: Path, train: str = "train") -> dict[str, Any]:
    """The task's dataset as torchtune reads it: a JSON file whose training list (`train`,
    or the split config.yaml's `splits.train` names) holds {input, output} records (the
    convention every cruijff task's data.py follows)."""
    return {
        "_component_": "torchtune.datasets.instruct_dataset",
        "source": "json",
        "data_files": str(data_path),
        "field": train,
        "split": "train",
        "column_map": {"input": "input", "output": "output"},
        "train_on_input": False,
        "packed": False,
    }


SPLITS = ("train", "validation", "test")
"""The lists a dataset file holds (README: Usage, 1. A task)."""


@functools.lru_cache(maxsize=64)
def dataset_problem(path: Path, stamp: tuple[int, int], field: str,
                    columns: tuple[str, ...]) -> str | None:
    """What keeps torchtune from reading `field`'s records of a JSON dataset file (with these
    columns as strings), or None. Parsed once per file version (`stamp`: size, mtime) and
    question, however many trials read it."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte {exc.start})"
    except json.JSONDecodeError as exc:
        return f"not JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
    except RecursionError:
        return "nested too deeply to read"
    except ValueError:  # int(): Python refuses integers of thousands of digits
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    if not isinstance(data, dict):
        return f"not a JSON object (it is a {type(data).__name__})"
    for split in (field, *SPLITS):
        if split in data and not isinstance(data[split], list):
            return f"'{split}' is not a list (it is a {type(data[split]).__name__})"
    records = data.get(field)
    if records is None:
        return f"no '{field}' list"
    if not records:
        return f"the '{field}' list is empty"
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            return f"{field} record {number} is not an object"
        for column in columns:
            if not isinstance(record.get(column), str):
                return f"{field} record {number} has no '{column}' string"
    return None


@functools.lru_cache(maxsize=64)
def _load_default(path: Path) -> dict[str, Any]:
    return load_yaml_mapping(path, "torchtune config")


@functools.lru_cache(maxsize=64)
def _trusted_components(path: Path) -> frozenset[str]:
    """The _component_ values the starting config file itself names: trusted like the file."""
    return named_components(_load_default(path))


def beside_python(name: str) -> str:
    """The command `name` next to this interpreter (`tune`, `torchrun`), so scripts work
    without an activated venv."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


LOSS = re.compile(r"\bloss:([-+0-9.eE]+|nan|inf)")
TOKENS_PER_S = re.compile(r"\btokens_per_second_per_gpu:([0-9.eE+-]+)")


def _newest_log(log_dir: Path) -> str:
    """The newest torchtune DiskLogger file in log_dir ("" if none)."""
    logs = sorted(log_dir.glob("log_*.txt"), key=lambda p: p.stat().st_mtime)
    return logs[-1].read_text(encoding="utf-8") if logs else ""


def _losses_in(text: str) -> list[float]:
    return [float(m.group(1)) for m in LOSS.finditer(text)]


def training_losses(log_dir: Path) -> list[float]:
    """Loss per step from the newest torchtune DiskLogger file in log_dir."""
    return _losses_in(_newest_log(log_dir))


def logged_throughput(log_dir: Path, processes: int) -> dict[str, float]:
    """What the newest DiskLogger file in log_dir says of speed and GPU memory."""
    return _throughput_in(_newest_log(log_dir), processes)


def _throughput_in(text: str, processes: int) -> dict[str, float]:
    """What any torchtune recipe's metric lines say of speed and GPU memory: the median of
    its per-step tokens/s per GPU times the processes, and the most memory torch held (the
    recipe logs GiB; on CUDA with log_peak_memory_stats)."""
    figures: dict[str, float] = {}
    speeds = sorted(float(m.group(1)) for m in TOKENS_PER_S.finditer(text))
    if speeds:
        figures["tokens_per_s"] = round(statistics.median(speeds) * processes, 2)
    for name, key in (("alloc", "torch_peak_allocated_mib"),
                      ("reserved", "torch_peak_reserved_mib")):
        peaks = [float(m.group(1)) for m in
                 re.finditer(rf"\bpeak_memory_{name}:([0-9.eE+-]+)", text)]
        if peaks:
            figures[key] = round(max(peaks) * 1024, 1)
    return figures


def _log_dir(trial_dir: Path, config: dict[str, Any]) -> Path:
    section = config.get("metric_logger")
    log_dir = section.get("log_dir") if isinstance(section, dict) else None
    return Path(log_dir) if isinstance(log_dir, str) and log_dir else trial_dir / LOG_DIR


def metric_lines(trial_dir: Path, config: dict[str, Any]) -> tuple[str, Path]:
    """The run's per-step metric lines and where they came from: cruijff's capture file
    (cruijff/metric_capture.py, written whatever metric logger the config picks), else,
    for a config without one (built before it existed) or a run that wrote no loss there,
    the newest DiskLogger file in the metric logger's log_dir."""
    capture = config.get(CAPTURE_KEY)
    if isinstance(capture, str) and capture:
        try:
            text = Path(capture).read_text(encoding="utf-8")
        except OSError:
            text = ""
        if LOSS.search(text):
            return text, Path(capture)
    log_dir = _log_dir(trial_dir, config)
    return _newest_log(log_dir), log_dir


TORCHTUNE_LOGGERS: dict[str, tuple[frozenset[str], bool]] = {
    f"torchtune.training.metric_logging.{name}": (frozenset(named), anything)
    for name, named, anything in (
        ("DiskLogger", ("log_dir", "filename"), True),
        ("StdoutLogger", (), True),
        ("TensorBoardLogger", ("log_dir", "organize_logs"), True),
        ("WandBLogger", ("project", "entity", "group", "log_dir"), True),
        ("MLFlowLogger", ("experiment_name", "tracking_uri", "run_id", "run_name"), False),
        ("CometLogger", ("api_key", "workspace", "project", "experiment_key", "mode", "online",
                         "experiment_name", "tags", "log_code"), True),
    )}
"""torchtune's own loggers' keywords, as `_keywords` reads them (tests/test_metric_loggers.py
checks the table against the installed torchtune): a build need not import torch for them."""


@functools.lru_cache(maxsize=64)
def _keywords(component: str) -> tuple[frozenset[str], bool] | None:
    """The keyword arguments a component takes, and whether it takes any (**kwargs); None
    when cruijff cannot tell (not importable here, no signature)."""
    if component in TORCHTUNE_LOGGERS:
        return TORCHTUNE_LOGGERS[component]
    return _signature_keywords(component)


def _signature_keywords(component: str) -> tuple[frozenset[str], bool] | None:
    """`_keywords` read off the component itself (importing its module)."""
    parts = component.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # not importable here: torchtune will say so when it runs
            continue
        try:
            for part in parts[cut:]:
                found = getattr(found, part)
            signature = inspect.signature(found)
        except (AttributeError, TypeError, ValueError):
            return None
        kinds = {p.name: p.kind for p in signature.parameters.values()}
        named = frozenset(name for name, kind in kinds.items()
                          if kind not in (inspect.Parameter.VAR_KEYWORD,
                                          inspect.Parameter.VAR_POSITIONAL))
        return named, inspect.Parameter.VAR_KEYWORD in kinds.values()
    return None


def fit_log_dir(config: dict[str, Any], log_dir: Path) -> None:
    """Give the metric logger the trial's log folder where it takes one (DiskLogger,
    TensorBoardLogger, WandBLogger), also when a design replaced the section without it; take
    it away where the logger could not accept it (MLFlowLogger: torchtune would fail)."""
    section = config.get("metric_logger")
    if not isinstance(section, dict) or not isinstance(section.get("_component_"), str):
        return
    takes = _keywords(section["_component_"])
    if takes is None:
        return
    named, anything = takes
    if "log_dir" in named:
        section.setdefault("log_dir", str(log_dir))
    elif not anything:
        section.pop("log_dir", None)


OUTPUT_KEYS = ("output_dir", "log_dir")
"""Names of the torchtune config keys that say where a run writes."""
REFERENCE = re.compile(r"\$\{([^}]*)\}")


def _interpolated(config: dict[str, Any], key: str, value: str) -> str:
    """A value with OmegaConf's `${other.key}` references to other values filled in (as
    torchtune's configs use them: `log_dir: ${output_dir}/logs`)."""
    values = dict(string_values(config))
    for _ in range(10):  # references to references, but not round in circles
        match = REFERENCE.search(value)
        if match is None:
            return value
        if match.group(1) not in values:
            break
        value = value[:match.start()] + values[match.group(1)] + value[match.end():]
    raise CruijffError(f"fine-tune config key {key} is {value!r}: cruijff cannot tell where "
                       "that points; give a path")


def recipe_command(recipe: str, config_file: str, processes: int | None = None) -> list[str]:
    """torchtune's LoRA recipe goes through cruijff's copy-before-merge subclass (see
    cruijff/recipes); every other recipe runs as torchtune ships it through cruijff's
    launcher (`python -m cruijff.recipes.run <recipe>`, which is `tune run <recipe>` plus the
    metric capture), a distributed one under torchrun with `processes` processes, as
    `tune run --nproc_per_node N` starts it (standalone: one node)."""
    if recipe == "lora_finetune_single_device":
        return [sys.executable, "-m", "cruijff.recipes.lora_finetune_single_device",
                "--config", config_file]
    launcher = ["-m", "cruijff.recipes.run", recipe, "--config", config_file]
    if processes is None:
        return [sys.executable, *launcher]
    return [beside_python("torchrun"), "--standalone", "--nproc_per_node", str(processes),
            *launcher]


DISTRIBUTED = "_distributed"
"""How torchtune names the recipes that need torchrun (they init a process group)."""
PROCESSES = "cruijff_nproc_per_node"
"""cruijff's own key in a distributed recipe's config (torchtune reads no such key): the
processes torchrun starts, one per GPU the trial's resources request, written at build so
that a run derives its command from the config alone, and so that the stage key (which
hashes the config) changes with the world size, which changes the training."""


def _gpu_count(value: object, key: str, where: str) -> int:
    """The GPUs one Slurm request names: `gres` a count or gpu[:type][:count] (another gres
    is no GPU); `gpus*` [type:]count, or a comma list of those."""
    text = str(value)
    if key == "gres" and not text.isdigit():
        name, *rest = text.split(":")
        if name != "gpu":
            return 0
        text = rest[-1] if rest and rest[-1].isdigit() else "1"
    counts = [item.rsplit(":", 1)[-1] for item in text.split(",")]
    if not all(count.isdigit() for count in counts):
        raise CruijffError(f"{where}.{key} is {value!r}: cruijff cannot tell how many GPUs "
                           "that is; give a count such as 8 or a100:8")
    return sum(int(count) for count in counts)


def process_count(resources: ResourceProfile, profile: str, model: str, recipe: str) -> int:
    """One process per GPU the trial's resources request, all on the node the job starts on
    (the script runs torchrun once, without srun). No GPU is an error, not a one-process
    fallback: a distributed config (70B) fits no single device, and learning so after the
    queue wait, or from a run that leaves the allocation's other GPUs idle, costs hours."""
    where = f"resources.{profile}"
    values = resources.model_dump(exclude_none=True)
    if values.get("nodes", 1) > 1:
        raise CruijffError(f"{where}.nodes is {values['nodes']}: torchtune's {recipe} runs "
                           "its processes on one node here; set nodes: 1 and gres to the GPUs "
                           "of that node")
    counts = {key: _gpu_count(values[key], key, where)
              for key in ("gres", "gpus", "gpus_per_node") if key in values}
    if "gpus_per_task" in values:
        tasks = str(values.get("ntasks_per_node") or values.get("ntasks") or 1)
        if not tasks.isdigit():
            raise CruijffError(f"{where}.ntasks is {tasks!r}: give a count of tasks")
        counts["gpus_per_task"] = int(tasks) * _gpu_count(values["gpus_per_task"],
                                                          "gpus_per_task", where)
    if len(set(counts.values())) > 1:
        asked = ", ".join(f"{key} {count}" for key, count in counts.items())
        raise CruijffError(f"{where} asks for different GPU counts ({asked}): keep one GPU "
                           "request")
    gpus = next(iter(counts.values()), 0)
    if gpus < 1:
        raise CruijffError(
            f"model {model} fine-tunes with torchtune's {recipe} recipe, one process per GPU, "
            f"but {where} requests no GPU: set {where}.gres to the GPUs to train on")
    return gpus


def _processes(config: dict[str, Any], recipe: str) -> int:
    value = config.get(PROCESSES)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CruijffError(
            f"fine-tune config key {PROCESSES} is {value!r}: torchtune's {recipe} recipe "
            "needs its process count, which the build writes there from the GPUs the "
            "resources request; build the experiment again (cruijff build --force)")
    return value


def recipe_for(config: dict[str, Any], default: str | None) -> str:
    """The family's recipe for its own config; otherwise LoRA or full, read off the model."""
    component = str(config.get("model", {}).get("_component_", ""))
    lora = "lora" in component.rsplit(".", 1)[-1]
    if default and ("lora" in default) == lora:
        return default
    return "lora_finetune_single_device" if lora else "full_finetune_single_device"


TOKENIZER_FILES = ("path", "merges_file", "special_tokens_path")
"""Keys of torchtune tokenizer builders that name a file."""


def _check_tokenizer_files(config: dict[str, Any], model: str) -> None:
    """A tokenizer file that is not there fails torchtune after the queue wait: say so now."""
    for key, value in string_values(config.get("tokenizer", {}), "tokenizer."):
        if key.rsplit(".", 1)[-1] in TOKENIZER_FILES and not Path(value).is_file():
            raise CruijffError(
                f"fine-tune key {key}: {value} is not a file: point it at {model}'s tokenizer "
                "file (or leave it out and cruijff sets it for the model's family)")


CRUIJFF_NOTES = {
    PROCESSES: "cruijff's: the processes torchrun starts, one per GPU requested",
    CAPTURE_KEY: "cruijff's: each step's loss, whatever metric_logger is (cruijff reads this)",
}
"""The comments finetune.yaml gives cruijff's own keys (torchtune reads neither)."""


@dataclass(frozen=True)
class FinetuneConfig(StageConfig):
    """A resolved fine-tune and the config file it started from, whose comments the written
    finetune.yaml keeps (so it reads like torchtune's own configs)."""

    template: Path | None = None

    def render(self) -> str:
        from cruijff.yaml_comments import dump_commented

        if self.template is None:
            return dump_yaml(self.data)
        return dump_commented(self.data, self.template, CRUIJFF_NOTES)


class FinetuneStage(Stage):
    name = "finetune"
    backend = "torchtune"
    shared = True
    folders = (CHECKPOINTS,)
    headlines = (Headline("final loss", "loss_last", ".4f"),)

    def enabled(self, trial: TrialSpec) -> bool:
        return trial.use_fine_tune

    def resolve(self, ctx: TrialContext) -> StageConfig:
        family_sets: dict[str, Any] = {}
        if ctx.config.finetune_config is not None:
            source = ctx.config.finetune_config
        elif ctx.family is not None:
            source = torchtune_config_path(ctx.family.lora[1])
            family_sets = ctx.family.tune_overrides
        else:
            from cruijff.models import suggest_model

            typo = suggest_model(ctx.trial.model)
            raise CruijffError(
                f"no torchtune config is known for model {ctx.trial.model}{typo}: "
                + ("correct the model id, or " if typo else "")
                + "set finetune_config in config.yaml to a torchtune YAML for it"
            )
        config = copy.deepcopy(_load_default(source))
        for key, value in family_sets.items():
            set_path(config, key, value)

        checkpoints = ctx.trial_dir / CHECKPOINTS
        config["output_dir"] = str(checkpoints)
        set_path(config, "checkpointer.checkpoint_dir", str(ctx.model_path))
        set_path(config, "checkpointer.checkpoint_files", checkpoint_files(ctx.model_path))
        set_path(config, "checkpointer.output_dir", str(checkpoints))
        for key, relative in (ctx.family.files if ctx.family else {}).items():
            set_path(config, key, str(ctx.model_path / relative))
        config["dataset"] = dataset_section(ctx.data_path, ctx.config.splits.train)
        set_path(config, "metric_logger.log_dir", str(ctx.trial_dir / LOG_DIR))

        for key, value in self.overrides(ctx.trial).items():
            set_existing(config, key, value, f"fine-tune config ({source.name})",
                         self.namespace)
        if ctx.model_path.is_dir():  # a dry run before the model is fetched cannot tell
            _check_tokenizer_files(config, ctx.trial.model)
        recipe = self._recipe(config, ctx.trial.model)
        if recipe.endswith(DISTRIBUTED):  # after the overrides: the resources' count wins
            profile = model_key(ctx.trial.model)
            config[PROCESSES] = process_count(ctx.config.resources_for(profile, self.name), profile,
                                              ctx.trial.model, recipe)
        # torchtune calls every _component_: only its own, and those the file names, may stay
        check_components(config, self.namespace, _trusted_components(source))
        fit_log_dir(config, ctx.trial_dir / LOG_DIR)  # after the check: imports the logger
        config[CAPTURE_KEY] = str(ctx.trial_dir / LOG_DIR / CAPTURE_FILE)
        return FinetuneConfig(config, self.command(ctx.trial_dir, config, ctx.trial.model),
                              template=source)

    @staticmethod
    def _recipe(config: dict[str, Any], model: str) -> str:
        family = family_of(model)
        return recipe_for(config, family.lora[0] if family else None)

    def command(self, trial_dir: Path, config: dict[str, Any], model: str) -> list[str]:
        """The recipe the model's family names when it suits the config (LoRA or full),
        else the single-device one that does: a recipe name from cruijff's own table; a
        distributed one with the process count the config holds."""
        recipe = self._recipe(config, model)
        processes = _processes(config, recipe) if recipe.endswith(DISTRIBUTED) else None
        return recipe_command(recipe, str(self.config_path(trial_dir)), processes)

    def output_paths(self, trial_dir: Path, config: dict[str, Any]) -> dict[str, Path]:
        """Every `output_dir` and `log_dir`, at any depth (checkpointer, metric logger,
        profiler), with torchtune's `${key}` references filled in, and the capture file."""
        return {key: Path(_interpolated(config, key, value))
                for key, value in string_values(config)
                if key.rsplit(".", 1)[-1] in OUTPUT_KEYS or key == CAPTURE_KEY}

    def check_data(self, trial: TrialSpec, data_path: Path, splits: SplitNames) -> None:
        """The records torchtune's instruct_dataset reads, as dataset_section sets it up
        (`finetune.dataset` is cruijff's alone: no trial changes it)."""
        dataset = dataset_section(data_path, splits.train)
        field = dataset["field"]
        names = tuple(dataset["column_map"][c] for c in ("input", "output"))
        try:
            stat = data_path.stat()
        except OSError:
            stamp = (-1, -1)
        else:
            stamp = (stat.st_size, stat.st_mtime_ns)
        problem = dataset_problem(data_path, stamp, field, names)
        if problem:
            raise CruijffError(
                f"dataset {data_path}: {problem}: the fine-tune reads its '{field}' list of "
                f"records with '{names[0]}' and '{names[1]}' strings (torchtune's "
                "instruct_dataset); fix the file, or fix the task's data.py build() and delete "
                "the file so the next build writes it again")

    def artifacts(self, trial_dir: Path, config: dict[str, Any]) -> list[Path]:
        log_dir = config.get("metric_logger", {}).get("log_dir")
        checkpoints = sorted(Path(config["output_dir"]).glob("*"))
        capture = config.get(CAPTURE_KEY)
        inside = log_dir and capture and Path(log_dir) in Path(capture).parents
        return [*checkpoints, *([Path(log_dir)] if log_dir else []),
                *([Path(capture)] if capture and not inside else [])]

    def losses(self, trial_dir: Path, config: dict[str, Any]) -> list[float]:
        return _losses_in(metric_lines(trial_dir, config)[0])

    def verify(self, trial_dir: Path, config: dict[str, Any]) -> Verified:
        """The final epoch's model (or, with save_adapter_weights_only, its adapter, which
        the eval merges with the base) exists and the loss was logged; checkpoints/final
        points at that epoch, which is what the eval stage loads."""
        epochs = int(config.get("epochs") or 1)
        epoch_dir = Path(config["output_dir"]) / f"epoch_{epochs - 1}"
        if checkpoint_shape(epoch_dir) is None:
            raise StageFailed(f"fine-tune finished without model or adapter weights in "
                              f"{epoch_dir}")
        text, source = metric_lines(trial_dir, config)
        losses = _losses_in(text)
        if not losses:
            capture = config.get(CAPTURE_KEY)
            where = f"neither {capture} nor {source}" if capture else str(source)
            raise StageFailed(f"fine-tune logged no training loss in {where}")
        final = trial_dir / FINAL_CHECKPOINT
        link = final.with_name(f".{final.name}.tmp")
        link.unlink(missing_ok=True)
        link.symlink_to(epoch_dir.name)
        os.replace(link, final)
        return Verified(
            outputs=[str(p.relative_to(trial_dir)) for p in (epoch_dir, final)],
            metrics={"loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)},
            throughput=_throughput_in(text, int(config.get(PROCESSES) or 1)),
        )
