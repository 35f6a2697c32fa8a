"""Configuration: the experiment's config.yaml (ExperimentConfig) and cruijff's own settings.

Both read `CRUIJFF_*` environment variables, which win over the file, so a cluster admin or a
CI job can override any field without editing YAML (`CRUIJFF_ORCHESTRATION__EXECUTOR=slurm`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from cruijff.errors import CruijffError, did_you_mean
from cruijff.fileio import load_yaml_mapping
from cruijff.registry import DEFAULT_PIPELINE

SLURM_WORD = re.compile(r"^[A-Za-z0-9_.,:+@/%=-]+$")
"""What a Slurm value may contain: no whitespace, quote or shell metacharacter, ever."""
SLURM_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
SLURM_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
PROFILE_NAME = re.compile(r"^(default|[A-Za-z0-9][A-Za-z0-9_.-]*__[A-Za-z0-9_.-]+)$")
PASS_THROUGH = frozenset({
    "begin", "comment", "constraint", "contiguous", "cores_per_socket", "cpus_per_gpu",
    "distribution", "exclude", "exclusive", "gpus", "gpus_per_node", "gpus_per_socket",
    "gpus_per_task", "hint", "licenses", "mem_per_cpu", "mem_per_gpu", "mincpus", "nice",
    "no_requeue", "nodelist", "ntasks", "ntasks_per_gpu", "qos", "requeue", "reservation",
    "sockets_per_node", "switches", "threads_per_core", "time_min", "tmp", "wckey",
})
"""Resource keys besides the fields that pass through to sbatch as `--key=value`: requests
for where and on what a job runs, nothing else. Options that set a job's environment, files,
working folder, command, identity or mail (export, output, chdir, wrap, uid, mail_user, ...)
are refused: a config value must not decide what a job runs or where its output goes."""
SET_BY_CRUIJFF = frozenset({"job_name", "output", "error", "chdir", "wrap", "open_mode"})
"""sbatch options cruijff sets itself (a job's name, log, folder and command)."""


def _slurm_word(value: Any, what: str) -> str:
    if isinstance(value, float) and not math.isfinite(value):  # YAML .nan reads as a float
        raise ValueError(f"{what} {value} is not a finite number")
    text = str(value)
    if not SLURM_WORD.fullmatch(text):
        raise ValueError(
            f"{what} {text!r} may only contain letters, digits and _ . , : + @ / % = -"
        )
    return text


def refuse_unsafe_key(key: str) -> None:
    """ValueError for a resource key that is neither a field nor in PASS_THROUGH."""
    if key in SET_BY_CRUIJFF:
        raise ValueError(f"resource key {key!r} is set by cruijff itself (a job's name, log, "
                         "folder and command are cruijff's): remove it")
    if key not in PASS_THROUGH:
        raise ValueError(
            f"resource key {key!r} is not one cruijff passes to sbatch (nothing that sets a "
            "job's environment, files, folder, command, identity or mail): remove it; "
            f"besides the known keys these pass through: {', '.join(sorted(PASS_THROUGH))}")


class ResourceProfile(BaseModel):
    """Slurm requests for one model (merged over `default`); the keys in PASS_THROUGH pass
    through to sbatch, any other key is refused. `stages` holds overrides per stage
    (`stages: {finetune: {mem: 16}}`), merged over the profile they are in; they never reach
    sbatch themselves."""

    model_config = ConfigDict(extra="allow")

    nodes: PositiveInt | None = None
    ntasks_per_node: PositiveInt | None = None
    cpus_per_task: PositiveInt | None = None
    time: str | None = None
    account: str | None = None
    partition: str | None = None
    mem: PositiveInt | None = Field(None, description="memory per node, in GB")
    gres: PositiveInt | str | None = Field(
        None, description="GPUs per node (a count) or a gres spec"
    )
    stages: dict[str, ResourceProfile] | None = Field(
        None, description="overrides for single stages, by stage name (finetune, eval, ...)"
    )

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        if v is not None and not SLURM_TIME.fullmatch(str(v)):
            raise ValueError(f"time {v!r} is not a Slurm time such as '00:30:00' or '1-12:00:00'")
        return None if v is None else str(v)

    @field_validator("account", "partition", mode="before")
    @classmethod
    def _word(cls, v: Any, info: Any) -> Any:
        return None if v is None else _slurm_word(v, info.field_name)

    @field_validator("gres", mode="before")
    @classmethod
    def _gres(cls, v: Any) -> Any:
        if (isinstance(v, str) and not v.isdigit()
                and not re.fullmatch(r"[A-Za-z0-9_]+(:[A-Za-z0-9_]+)*", v)):
            raise ValueError(f"gres {v!r} must be a GPU count or a spec such as 'gpu:a100:2'")
        return v

    @model_validator(mode="after")
    def _extras(self) -> ResourceProfile:
        for stage, profile in (self.stages or {}).items():
            if profile.stages:
                raise ValueError(f"stages.{stage}: a stage's profile cannot hold stages itself")
        for key, value in (self.model_extra or {}).items():
            if not SLURM_KEY.fullmatch(key):
                raise ValueError(f"resource key {key!r} must be lowercase letters, digits and _")
            refuse_unsafe_key(key)
            if not isinstance(value, bool) and value is not None:
                if not isinstance(value, int | float | str):
                    raise ValueError(f"resource {key} must be a single value, not {value!r}")
                _slurm_word(value, key)
        return self

    def merged_over(self, base: ResourceProfile) -> ResourceProfile:
        """This profile's set values on top of base's: one flat profile (no `stages`)."""
        data = base.requests()
        data.update(self.requests())
        return ResourceProfile(**data)

    def requests(self) -> dict[str, Any]:
        """What this profile asks Slurm for: its set values, without `stages`."""
        return self.model_dump(exclude_none=True, exclude={"stages"})


def slurm_seconds(value: str) -> int:
    """Seconds in a Slurm time (SLURM_TIME): M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    days, dash, rest = str(value).rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if dash:
        hours, minutes, seconds = (*parts, 0, 0)[:3]
    else:
        hours, minutes, seconds = ([0] * (3 - len(parts)) + parts if len(parts) == 3
                                   else [0, *parts, 0][:3])
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def slurm_time(seconds: float) -> str:
    """A Slurm time for whole seconds (rounded up): HH:MM:SS, or D-HH:MM:SS from a day."""
    days, rest = divmod(math.ceil(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}-" if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def gpu_count(gres: int | str) -> int | None:
    """The GPUs a gres asks for: a count, or gpu[:type][:count]; None for another gres."""
    text = str(gres)
    if text.isdigit():
        return int(text)
    name, *rest = text.split(":")
    if name != "gpu":
        return None
    return int(rest[-1]) if rest and rest[-1].isdigit() else 1


def most_of(profiles: dict[str, ResourceProfile], where: str) -> ResourceProfile:
    """The one profile that serves every stage (stage name -> its profile): the most memory,
    time, GPUs and CPUs any of them asks for; every other key as they all set it (a key two
    stages set differently, such as a partition, is refused: one worker job serves both)."""
    asked = {stage: profile.requests() for stage, profile in profiles.items()}
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for values in asked.values() for k in values):
        values = {stage: v[key] for stage, v in asked.items() if key in v}
        distinct = list(dict.fromkeys(values.values()))
        if len(distinct) == 1:
            merged[key] = distinct[0]
        elif key == "time":
            merged[key] = max(distinct, key=slurm_seconds)
        elif key in ("mem", "cpus_per_task"):
            merged[key] = max(distinct)
        elif key == "gres" and None not in (counts := [gpu_count(v) for v in distinct]):
            most = max(counts)  # type: ignore[type-var]
            tied = [v for v, c in zip(distinct, counts, strict=True) if c == most]
            merged[key] = tied[0] if len(tied) == 1 else None
        if key not in merged or merged[key] is None:
            shown = ", ".join(f"{stage} {value}" for stage, value in values.items())
            raise CruijffError(
                f"{where}: the stages ask for different {key} ({shown}), and one worker job "
                f"runs all of a trial's stages: set {key} once for the model, not per stage")
    return ResourceProfile(**merged)


ROLES = ("train", "validation", "test")
"""cruijff's split roles: fine-tuning and demonstrations, prompt scoring, the eval."""


class SplitNames(BaseModel):
    """`splits`: which of a dataset file's splits plays each of cruijff's roles. A split a
    stage config names by a role (`train`, `validation`, `test`) is read from the split mapped
    here: `{test: validation}` evaluates a task whose `split` is `test` on 'validation'."""

    model_config = ConfigDict(extra="forbid")

    train: str = Field("train", description="fine-tuning and prompt demonstrations")
    validation: str = Field("validation", description="scoring prompt candidates")
    test: str = Field("test", description="the eval (for a task that takes `split`)")

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _split_name(cls, v: Any) -> Any:
        if not isinstance(v, str) or not v or v != v.strip() or not v.isprintable():
            raise ValueError(f"split name {v!r} must be a non-empty string without "
                             "surrounding spaces or control characters")
        return v

    def dataset_split(self, split: str) -> str:
        """The dataset's split for a split name a config gives (a role, or any other name,
        which stays as it is)."""
        return str(getattr(self, split)) if split in ROLES else split


class GrowPolicy(BaseModel):
    """`orchestration.grow_on_oom`: a Slurm attempt that ran out of memory is retried asking
    for `factor` times the memory, never more than `max_mem`."""

    model_config = ConfigDict(extra="forbid")

    factor: float = Field(2.0, gt=1, le=16, allow_inf_nan=False,
                          description="the retry asks for this many times the memory")
    max_mem: PositiveInt = Field(description="the most memory (GB) a retry may ask for")


PROLOGUE_LINE_MAX = 1000


def prologue_line_problem(line: object) -> str | None:
    """Why `line` cannot be a line of `slurm.prologue`, or None. A prologue line is a shell
    line by design, run as written (`module load cuda/12.4`, `conda activate env`); what is
    checked is that it stays one line of its own: printable (no newline, carriage return,
    tab, NUL or other control character), its quotes closed and no trailing backslash or
    here-document (each would run into the script's next lines), and no `#SBATCH`
    (dask-jobqueue puts the prologue right under the header, where sbatch reads directives)."""
    if not isinstance(line, str):
        return f"{line!r} is not a line of text"
    if not line.strip():
        return "is empty"
    if len(line) > PROLOGUE_LINE_MAX:
        return f"is longer than {PROLOGUE_LINE_MAX} characters"
    if not line.isprintable():
        return (f"{line!r} is not one printable line (no newline, carriage return, tab, NUL "
                "or other control character)")
    if line.lstrip().upper().startswith("#SBATCH"):
        return f"{line!r} is an #SBATCH directive: ask for resources under `resources`"
    try:
        shlex.split(line, comments=True)
    except ValueError as exc:  # an open quote, or a backslash at the end
        return f"{line!r} does not end where it ends ({str(exc).lower()})"
    if re.search(r"<<(?!<)", line):
        return f"{line!r} has a here-document, which would read the script's next lines"
    return None


class SlurmConfig(BaseModel):
    """`slurm`: what a site's batch jobs need before cruijff's command starts."""

    model_config = ConfigDict(extra="forbid")

    prologue: list[str] = Field(
        default_factory=list, description="shell lines (module load ..., conda activate ..., "
        "source .../bin/activate) run as written at the start of every generated "
        "`<stage>.slurm` and every worker job, after the #SBATCH lines; one line each")

    @field_validator("prologue", mode="before")
    @classmethod
    def _lines(cls, v: Any) -> Any:
        lines = [v] if isinstance(v, str) else v
        if isinstance(lines, list):
            for number, line in enumerate(lines, 1):
                problem = prologue_line_problem(line)
                if problem:
                    raise ValueError(f"line {number} {problem}")
        return lines


class OrchestrationConfig(BaseModel):
    """How trials are executed: on this machine or as Slurm jobs."""

    model_config = ConfigDict(extra="forbid")

    executor: Literal["local", "slurm"] = "local"
    workers: PositiveInt | None = Field(
        None, description="local: Dask worker processes (default: one per CPU core)"
    )
    retries: NonNegativeInt = Field(1, description="retries of a failed stage")
    max_jobs: PositiveInt = Field(
        4, description="slurm: at most this many worker jobs per resource profile at once"
    )
    submit_retries: NonNegativeInt = Field(
        3, description="slurm: retries of a failed sbatch (waits 2, 4, 8 ... s between tries)"
    )
    submit_timeout_s: PositiveFloat = Field(
        60, allow_inf_nan=False, description="slurm: give up submitting a worker job (and "
        "stop the run with one line) this many seconds after its first sbatch try"
    )
    interface: str | None = Field(
        None, description="slurm: the network interface (e.g. ib0) the run's Dask scheduler "
        "and workers use: one compute nodes reach the login node on (default: the host's)"
    )
    host: str | None = Field(
        None, description="slurm: the address the run's Dask scheduler listens on, instead "
        "of an interface"
    )
    grow_on_oom: GrowPolicy | None = Field(
        None, description="slurm: retry an attempt that ran OUT_OF_MEMORY with more memory "
        "({factor: 2, max_mem: 64}); off by default"
    )

    @field_validator("interface", "host", mode="before")
    @classmethod
    def _network_word(cls, v: Any, info: Any) -> Any:
        return None if v is None else _slurm_word(v, info.field_name)


class ExperimentConfig(BaseSettings):
    """The experiment `config.yaml`. Relative paths resolve against the file's folder."""

    model_config = SettingsConfigDict(
        env_prefix="CRUIJFF_",
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
    )

    model_dir: Path = Field(Path("models"), description="models: <model_dir>/<org>__<name>")
    data_dir: Path = Field(Path("data"), description="datasets: <data_dir>/<dataset>")
    tasks_dir: Path = Field(Path("tasks"), description="task modules: <tasks_dir>/<task>/")
    use_fine_tune: bool = True
    use_prompt_opt: bool = False
    run_control_trials: bool = True
    max_trials: PositiveInt = Field(
        10_000, description="build refuses a design of more trials than this (counted before "
        "expanding, so a runaway grid fails at once); raise it for a bigger experiment",
    )
    finetune_config: Path | None = Field(
        None,
        validation_alias=AliasChoices("finetune_config", "torchtune_config"),
        description="a torchtune YAML used instead of the model's built-in default",
    )
    eval_config: Path | None = Field(
        None,
        validation_alias=AliasChoices("eval_config", "inspect_config"),
        description="a YAML of eval settings (task_args, model_args, generate) over defaults",
    )
    resources: dict[str, ResourceProfile] = Field(
        default_factory=lambda: {"default": ResourceProfile()}
    )
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    pipeline: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PIPELINE),
        description="the stages a trial may run, in order (use_fine_tune/use_prompt_opt "
        "still switch theirs off); registered stages only",
    )
    splits: SplitNames = Field(
        default_factory=SplitNames,
        description="the dataset split each of cruijff's roles reads: {train, validation, "
        "test}, e.g. {test: validation} for data without a test split",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)

    @field_validator("resources")
    @classmethod
    def _profile_names(cls, v: dict[str, ResourceProfile]) -> dict[str, ResourceProfile]:
        for name in v:
            if not PROFILE_NAME.fullmatch(name):
                raise ValueError(
                    f"resources key {name!r} must be 'default' or a model as '<org>__<name>'"
                )
        v.setdefault("default", ResourceProfile())
        return v

    @classmethod
    def load(cls, path: Path) -> ExperimentConfig:
        """Read config.yaml; every problem becomes one CruijffError naming the key."""
        path = Path(path).expanduser().resolve()
        data = load_yaml_mapping(path, "config file")
        try:
            config = cls(**data)
        except ValidationError as exc:
            raise CruijffError(f"{path}: {describe_validation_error(exc, cls)}") from None
        except SettingsError as exc:
            raise environment_error(exc) from None
        problem = config.stage_profile_problem()
        if problem:
            raise CruijffError(f"{path}: {problem}")
        return config.resolved_against(path.parent)

    def resolved_against(self, folder: Path) -> ExperimentConfig:
        updates = {}
        for name in ("model_dir", "data_dir", "tasks_dir", "finetune_config", "eval_config"):
            value = getattr(self, name)
            if value is not None:
                updates[name] = (folder / Path(value).expanduser()).resolve()
        return self.model_copy(update=updates)

    def resources_for(self, profile: str, stage: str | None = None) -> ResourceProfile:
        """What one model's stage asks for (without a stage: the model's own profile), flat:
        `default` < `default.stages[stage]` < the model's entry < its `stages[stage]`."""
        default = self.resources["default"]
        specific = self.resources.get(profile)
        layers = [default, specific]
        if stage is not None:
            layers = [default, (default.stages or {}).get(stage),
                      specific, ((specific.stages or {}) if specific else {}).get(stage)]
        merged = ResourceProfile()
        for layer in layers:
            if layer is not None:
                merged = layer.merged_over(merged)
        return merged

    def worker_profile(self, profile: str, stages: list[str]) -> ResourceProfile:
        """What the worker jobs of a trial running `stages` ask for: one Dask worker job runs
        all of a trial's stages one after another, so it asks for the most any of them asks
        for, field by field (mem, time, gres count, cpus_per_task; see most_of)."""
        if not stages:
            return self.resources_for(profile)
        return most_of({s: self.resources_for(profile, s) for s in stages},
                       f"resources.{profile}")

    def stage_profile_problem(self) -> str | None:
        """A stage named under `resources.<profile>.stages` that the pipeline does not run
        (it would be silently ignored), as one line; None when there is none."""
        for name, profile in self.resources.items():
            for stage in profile.stages or {}:
                if stage not in self.pipeline:
                    return (f"resources.{name}.stages.{stage}: the pipeline has no stage "
                            f"{stage!r} ({', '.join(self.pipeline)})"
                            f"{did_you_mean(stage, self.pipeline)}")
        return None

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def _field_names(model: type[BaseModel]) -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        names.append(name)
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.extend(str(a) for a in alias.choices)
    return names


def describe_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line for the first problem in a pydantic error, with a suggestion for unknown keys."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        owner: type[BaseModel] = model
        for part in first["loc"][:-1]:
            sub = owner.model_fields.get(str(part)) if isinstance(part, str) else None
            if sub is not None and isinstance(sub.annotation, type) and issubclass(
                sub.annotation, BaseModel
            ):
                owner = sub.annotation
        return f"unknown key '{loc}'{did_you_mean(key, _field_names(owner))}{more}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}{more}"


def environment_error(exc: SettingsError) -> CruijffError:
    """A CRUIJFF_* variable pydantic-settings could not parse (a list or mapping field takes
    JSON there): one line naming the variable and the fix."""
    match = re.search(r'field "([^"]+)"', str(exc))
    field = match.group(1) if match else ""
    prefix = f"CRUIJFF_{field}".upper()
    names = sorted(k for k in os.environ
                   if k.upper() == prefix or k.upper().startswith(f"{prefix}__"))
    bad = [k for k in names if not _is_json(os.environ[k])] or names
    cause = exc.__cause__
    why = f" ({cause.msg} at column {cause.colno})" if isinstance(
        cause, json.JSONDecodeError) else ""
    name = f"environment variable {bad[0]}" if bad else "a CRUIJFF_* environment variable"
    shown = f" `{field}`" if field else ""
    return CruijffError(f"{name} is not valid JSON{why}: it sets{shown}, which takes a JSON "
                        "object or list there; fix it, or unset it to use config.yaml")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


class CruijffSettings(BaseSettings):
    """Settings of the cruijff installation (not of one experiment)."""

    model_config = SettingsConfigDict(env_prefix="CRUIJFF_", extra="ignore")

    home: Path = Field(Path("~/.cruijff"), description="cruijff's own state (server DB, caches)")
    offline: bool = Field(False, description="never download models (also HF_HUB_OFFLINE=1)")
    server_database_url: str | None = Field(
        None,
        description="the database of the managed Prefect server, e.g. a PostgreSQL URL "
        "(postgresql+asyncpg://user:password@host:5432/db) instead of SQLite under the home; "
        "never written to any file",
        repr=False,  # it may hold a password
    )
    database_url: str | None = Field(
        None,
        description="the results store of `cruijff analyze`: any SQLAlchemy URL, e.g. "
        "postgresql+psycopg://user:password@host:5432/db, instead of the SQLite file "
        "<experiment>/results.sqlite; never written to any file",
        repr=False,  # it may hold a password
    )

    @property
    def is_offline(self) -> bool:
        return self.offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
