"""Controls and treatments -> trials.

Controls apply to every trial. Each treatment is a set of changes on top of the controls; a
list value expands (cartesian within that treatment; wrap a list in a list to set a list-valued
key). A treatment's control trial has the same model and dataset and only the controls.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cruijff.components import COMPONENT_KEY, RESOLVER
from cruijff.errors import CruijffError, did_you_mean
from cruijff.fileio import load_json, parse_json, parse_yaml, type_name
from cruijff.models import absolute_model, validate_model
from cruijff.plan import Plan, TrialSpec, short_value
from cruijff.registry import STAGES
from cruijff.settings import ExperimentConfig
from cruijff.tasks import validate_name

TRIAL_KEYS: dict[str, type] = {
    "model": str,
    "dataset": str,
    "use_fine_tune": bool,
    "use_prompt_opt": bool,
}
NAMESPACE_ALIASES = {"torchtune": "finetune", "inspect": "eval"}
"""Each registered stage's name is the namespace of its design keys; these are other names."""
KEY_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MANAGED_NAMES = frozenset({"output_dir", "log_dir", "checkpoint_dir", "checkpoint_files",
                           "data_files", "data_path", "eval_config", "task_file"})
"""Last parts of stage keys that name a file or folder cruijff fills in (in the trial folder,
or from the model and dataset). A design that set them could make a run write outside the
experiment, and `run --force` move whatever is there into the archive."""
MANAGED_KEYS = ("finetune.dataset", "prompt_opt.model", "prompt_opt.task",
                "prompt_opt.task_function")
"""Whole stage keys (and what is under them) that cruijff fills in from model and task."""
CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
"""Control characters other than tab and newlines: never part of a prompt or setting, and
they reach terminals (escape sequences) and the comment line of the .slurm scripts."""
COUNT_CAP = 10**15
"""Trial counts stop here: far past any limit, and short enough to print."""


def _namespaces() -> dict[str, str]:
    """Namespace -> stage: every registered stage's name (known without importing any stage),
    and the aliases."""
    return {**{name: name for name in STAGES.names()}, **NAMESPACE_ALIASES}


def canonical_key(key: object) -> str:
    """A trial-level key, or '<stage>.<path>' with the namespace alias resolved."""
    if not isinstance(key, str):
        raise CruijffError(f"key {key!r} must be a string")
    if key in TRIAL_KEYS:
        return key
    namespace, dot, rest = key.partition(".")
    if not dot:
        raise CruijffError(
            f"unknown key {key!r}{did_you_mean(key, TRIAL_KEYS)}: use one of "
            f"{', '.join(TRIAL_KEYS)} or a dotted key such as torchtune.model.lora_rank"
        )
    namespaces = _namespaces()
    if namespace not in namespaces:
        raise CruijffError(
            f"unknown namespace {namespace!r} in key {key!r}{did_you_mean(namespace, namespaces)}"
            f": use one of {', '.join(namespaces)}"
        )
    parts = rest.split(".")
    if not all(KEY_PART.fullmatch(p) for p in parts):  # `$` would allow a final newline
        raise CruijffError(f"key {key!r} has an invalid part: use names like model.lora_rank")
    return f"{namespaces[namespace]}.{rest}"


def _check_value(key: str, value: Any) -> None:
    """Refuse a stage key cruijff manages (also as a key inside a mapping value, which
    replaces a whole section), control characters in any string of the value, NaN and
    infinities anywhere in it (YAML's .nan, JSON's 1e999: no setting means them, and a NaN
    learning rate trains to garbage silently), a `_component_` for any stage but the
    fine-tune (only torchtune instantiates them; its stage checks the final config), and
    OmegaConf resolver calls in fine-tune strings (components.RESOLVER)."""
    stack: list[tuple[str, Any]] = [(key, value)]
    while stack:
        path, item = stack.pop()
        last = path.rsplit(".", 1)[-1]
        if "." in path and (last in MANAGED_NAMES or any(
                path == m or path.startswith(f"{m}.") for m in MANAGED_KEYS)):
            raise CruijffError(
                f"key {path!r} names a file or folder that cruijff sets itself (in the trial "
                "folder, or from the model and dataset): drop it from the design; choose the "
                "model and dataset with 'model' and 'dataset'")
        if isinstance(item, dict):
            stack.extend((f"{path}.{k}", v) for k, v in item.items())
            item = "".join(str(k) for k in item)  # the keys: checked like a string value
        elif isinstance(item, list):
            stack.extend((path, v) for v in item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise CruijffError(f"key {path!r}: {item} is not a finite number: give a number "
                               "such as 1e-4")
        if last == COMPONENT_KEY and not path.startswith("finetune."):
            raise CruijffError(
                f"key {path!r}: only the fine-tune (torchtune) config may name a "
                f"{COMPONENT_KEY}, and only from torchtune: drop it")
        if isinstance(item, str) and path.startswith("finetune.") and RESOLVER.search(item):
            raise CruijffError(
                f"key {path!r}: {item[:60]!r}{'...' if len(item) > 60 else ''} calls an "
                "OmegaConf resolver, which torchtune would run when it loads the config: write "
                "the value itself")
        if isinstance(item, str) and (bad := CONTROL_CHARACTER.search(item)):
            raise CruijffError(
                f"key {key!r}: a value holds the control character {bad.group()!r}: remove it "
                "(tabs and newlines are fine)")


def parse_assignment(text: str, option: str) -> tuple[str, Any]:
    """'torchtune.model.lora_rank=4' -> ('finetune.model.lora_rank', 4); values are YAML."""
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise CruijffError(
            f"{option} {text!r} must be KEY=VALUE, e.g. {option} torchtune.model.lora_rank=4"
        )
    value = parse_yaml(raw, f"{option} {key.strip()}") if raw.strip() else ""
    if isinstance(value, dict):
        raise CruijffError(f"{option} {key.strip()}: a value cannot be a mapping; use JSON")
    key = canonical_key(key.strip())
    _check_value(key, value)
    return key, value


def _object(data: Any, source: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise CruijffError(
            f"{source} must be a JSON object {{\"key\": value}}, not {type_name(data)}"
        )
    checked: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for written, value in data.items():
        key = canonical_key(written)
        if key in checked:  # even with equal values: one key, one place to read it
            raise CruijffError(
                f"{source} sets {key} twice, as {spelled[key]!r} and {written!r} (one key under "
                "two names): keep one of them")
        checked[key], spelled[key] = value, written
    for key, value in checked.items():
        _check_value(key, value)
    return checked


def _objects(data: Any, source: str) -> list[dict[str, Any]]:
    """A JSON object, or a list of them (one treatment each)."""
    if isinstance(data, list):
        if not data:
            raise CruijffError(f"{source} is an empty list")
        return [_object(item, f"{source} item {i + 1}") for i, item in enumerate(data)]
    return [_object(data, source)]


def _merge_controls(target: dict[str, Any], new: dict[str, Any], source: str) -> None:
    for key, value in new.items():
        if key in target and target[key] != value:
            raise CruijffError(
                f"control {key} is set twice ({target[key]!r} and {value!r} from {source})"
            )
        target[key] = value


@dataclass
class Design:
    """What the user asked for, before expansion: the input of `expand`."""

    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    controls: dict[str, Any] = field(default_factory=dict)
    treatments: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_options(
        cls,
        *,
        models: Sequence[str] = (),
        datasets: Sequence[str] = (),
        control: Sequence[str] = (),
        controls: Sequence[str] = (),
        control_path: Sequence[Path] = (),
        treatment: Sequence[str] = (),
        treatments: Sequence[str] = (),
        treatment_path: Sequence[Path] = (),
    ) -> Design:
        """Every form the spec allows: K=V, JSON strings and JSON files, for both sides."""
        design = cls(models=list(models), datasets=list(datasets))
        for text in control:
            key, value = parse_assignment(text, "--control")
            _merge_controls(design.controls, {key: value}, "--control")
        for text in controls:
            _merge_controls(design.controls, _object(parse_json(text, "--controls"), "--controls"),
                            "--controls")
        for path in control_path:
            data = load_json(Path(path), "--control-path file")
            _merge_controls(design.controls, _object(data, str(path)), str(path))
        for text in treatment:
            design.treatments.append(dict([parse_assignment(text, "--treatment")]))
        for text in treatments:
            design.treatments += _objects(parse_json(text, "--treatments"), "--treatments")
        for path in treatment_path:
            design.treatments += _objects(load_json(Path(path), "--treatment-path file"), str(path))
        return design

    def to_dict(self) -> dict[str, Any]:
        return {"models": self.models, "datasets": self.datasets, "controls": self.controls,
                "treatments": self.treatments}


def trial_ids() -> Iterable[str]:
    """a, b, ..., z, aa, ab, ...: bijective base 26, shortest first."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for length in itertools.count(1):
        for combo in itertools.product(letters, repeat=length):
            yield "".join(combo)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _check_trial_value(key: str, value: Any) -> Any:
    expected = TRIAL_KEYS[key]
    if not isinstance(value, expected):
        raise CruijffError(f"{key} must be {type_name(expected())}, not {value!r}")
    if isinstance(value, str) and (not value.isprintable() or value != value.strip()):
        # The name checks' `$` lets one trailing newline through ('d.json\n'), which would
        # become a file name and a message broken over several lines.
        raise CruijffError(f"{key} {value!r} must not start or end with spaces, nor contain "
                           "newlines or other control characters")
    if key == "model":
        validate_model(value)
    elif key == "dataset":
        validate_name(value, "dataset")
    return value


def _variants(treatment: dict[str, Any]) -> list[dict[str, Any]]:
    """Cartesian product of the list values of one treatment, in key order."""
    keys = list(treatment)
    if not keys:
        raise CruijffError("a treatment is empty: give at least one key")
    for key in keys:
        if isinstance(treatment[key], list) and not treatment[key]:
            raise CruijffError(f"treatment key {key} has an empty list of values")
    choices = [_as_list(treatment[k]) for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*choices)]


def _count_trials(treatments: list[dict[str, Any]], models: list[Any], datasets: list[Any],
                  controls: bool) -> int:
    """How many trials the design makes at most (before equal ones are merged), from the
    list lengths alone: counted before expanding, so a grid of millions is refused at once
    instead of filling memory. Stops counting at COUNT_CAP (a 10 MB design can multiply to a
    number too long to print)."""
    treated, control_pairs = 0, len(models) * len(datasets)
    all_models, all_datasets = ({repr(v) for v in models}, {repr(v) for v in datasets})
    for treatment in treatments:
        own_models = _as_list(treatment.get("model", models))
        own_datasets = _as_list(treatment.get("dataset", datasets))
        pairs = len(own_models) * len(own_datasets)
        variants = 1
        for key, value in treatment.items():
            if key not in ("model", "dataset") and isinstance(value, list):
                variants = min(variants * len(value), COUNT_CAP)
        treated = min(treated + pairs * variants, COUNT_CAP)
        if "model" in treatment or "dataset" in treatment:  # control trials for new pairs
            control_pairs = min(control_pairs + pairs, COUNT_CAP)
            all_models.update(repr(v) for v in own_models)
            all_datasets.update(repr(v) for v in own_datasets)
    if controls:
        treated += min(control_pairs, len(all_models) * len(all_datasets))
    return min(treated, COUNT_CAP)


def expand(design: Design, config: ExperimentConfig, config_dir: Path | None = None) -> Plan:
    """All trials, control trials first, with deterministic ids. A local model folder given
    relative to the experiment config (in `config_dir`; the working folder if None) becomes
    an absolute path."""
    controls = dict(design.controls)
    base_models = _unique(design.models + _as_list(controls.pop("model", [])))
    base_datasets = _unique(design.datasets + _as_list(controls.pop("dataset", [])))
    trial_flags = {
        "use_fine_tune": controls.pop("use_fine_tune", config.use_fine_tune),
        "use_prompt_opt": controls.pop("use_prompt_opt", config.use_prompt_opt),
    }
    for key, value in [*(("model", m) for m in base_models),
                       *(("dataset", d) for d in base_datasets), *trial_flags.items()]:
        _check_trial_value(key, value)

    count = _count_trials(design.treatments, base_models, base_datasets,
                          config.run_control_trials or not design.treatments)
    if count > config.max_trials:
        shown = f"at least {count:,}" if count >= COUNT_CAP else f"up to {count:,}"
        raise CruijffError(
            f"the design makes {shown} trials; the limit is max_trials = {config.max_trials:,}: "
            "split the grid, or raise max_trials in config.yaml (or CRUIJFF_MAX_TRIALS)")
    base = config_dir or Path.cwd()
    base_models = _unique([absolute_model(m, base) for m in base_models])
    pairs: list[tuple[str, str]] = list(itertools.product(base_models, base_datasets))
    treated: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
    for number, treatment in enumerate(design.treatments, start=1):
        for variant in _variants(treatment):
            for key in TRIAL_KEYS.keys() & variant.keys():
                _check_trial_value(key, variant[key])
            models = [absolute_model(variant["model"], base)] if "model" in variant else base_models
            datasets = [variant["dataset"]] if "dataset" in variant else base_datasets
            if not models or not datasets:
                what = "model" if not models else "dataset"
                raise CruijffError(
                    f"treatment {number} has no {what}: pass --{what} or put '{what}' in it"
                )
            changes = {k: v for k, v in variant.items() if k not in ("model", "dataset")}
            for model, dataset in itertools.product(models, datasets):
                pairs.append((model, dataset))
                label = dict(variant)
                treated.append((model, dataset, changes, label))
    pairs = _unique(pairs)
    if not pairs:
        raise CruijffError("no trials: pass --model and --dataset (or set them in a treatment)")

    def settings_of(changes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bool]]:
        stage = {**controls, **{k: v for k, v in changes.items() if k not in TRIAL_KEYS}}
        flags = {k: changes.get(k, v) for k, v in trial_flags.items()}
        return stage, flags

    ids = trial_ids()
    trials: list[TrialSpec] = []
    notices: list[str] = []
    control_of: dict[tuple[str, str], TrialSpec] = {}
    if config.run_control_trials or not design.treatments:
        for model, dataset in pairs:
            stage, flags = settings_of({})
            trial = TrialSpec(next(ids), model, dataset, flags["use_fine_tune"],
                              flags["use_prompt_opt"], stage, {}, None)
            control_of[(model, dataset)] = trial
            trials.append(trial)

    seen: dict[tuple[Any, ...], str] = {}
    for model, dataset, changes, label in treated:
        stage, flags = settings_of(changes)
        control = control_of.get((model, dataset))
        fingerprint = (model, dataset, flags["use_fine_tune"], flags["use_prompt_opt"],
                       repr(sorted(stage.items())))
        described = ", ".join(f"{k}={short_value(v)}" for k, v in label.items())
        if control is not None and fingerprint == (
            control.model, control.dataset, control.use_fine_tune, control.use_prompt_opt,
            repr(sorted(control.settings.items()))
        ):
            notices.append(f"treatment {{{described}}} equals control trial {control.id}; "
                           "not duplicated")
            continue
        if fingerprint in seen:
            notices.append(f"treatment {{{described}}} repeats trial {seen[fingerprint]}; "
                           "not duplicated")
            continue
        trial = TrialSpec(next(ids), model, dataset, flags["use_fine_tune"],
                          flags["use_prompt_opt"], stage, label,
                          control.id if control else None)
        seen[fingerprint] = trial.id
        trials.append(trial)
    return Plan(trials, notices)


def _unique(items: list[Any]) -> list[Any]:
    return list(dict.fromkeys(items))
