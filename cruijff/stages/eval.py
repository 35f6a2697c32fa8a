"""Evaluation with Inspect AI: the task's @task, its eval.yaml args, on the trial's model."""

from __future__ import annotations

import copy
import os
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cruijff import prompt_format
from cruijff.adapters import LoraBase, checkpoint_shape, merged_model
from cruijff.errors import CruijffError, did_you_mean
from cruijff.fileio import load_yaml_mapping
from cruijff.plan import TrialSpec
from cruijff.prompt_wrap import apply_prompt
from cruijff.splits import settle_eval_split
from cruijff.stages import (
    Headline,
    Stage,
    StageConfig,
    StageFailed,
    TrialContext,
    Verified,
    set_existing,
)
from cruijff.stages.finetune import FINAL_CHECKPOINT, FinetuneStage

EDITABLE = ("task_args", "model_args", "generate", "limit", "checkpoint", "metric")
"""Top-level eval.yaml keys a user may set (the rest are cruijff's bookkeeping)."""


def _generate_fields() -> set[str]:
    from inspect_ai.model import GenerateConfig  # imported only when a generate key is set

    return set(GenerateConfig.model_fields)


def inspect_target(ctx: TrialContext) -> dict[str, Any]:
    """The task and model an Inspect-based stage evaluates for this trial: the fine-tuned
    checkpoint when the trial fine-tunes, else the base model; greedy by default. The task
    gets only the arguments it takes: data_path and data_ext where it has them (the data
    file stays `data_path` of the config, for cruijff's own use), then eval.yaml's defaults,
    the experiment's eval_config and the design's `eval.<arg>`. A required argument none of
    them gives is a build error, not a TypeError after every fine-tune has run."""
    task = ctx.task
    model = (ctx.trial_dir / FINAL_CHECKPOINT) if ctx.trial.use_fine_tune else ctx.model_path
    family = ctx.family
    data = {"data_path": str(ctx.data_path), "data_ext": ctx.data_path.suffix.lstrip(".")}
    task_args = {
        **copy.deepcopy(task.defaults),
        **{arg: value for arg, value in data.items() if task.has_parameter(arg)},
    }
    for arg, value in _task_arg_settings(ctx):  # type-checked as EvalStage._set does
        if arg in task_args:
            set_existing({"task_args": task_args}, f"task_args.{arg}", value,
                         f"task '{task.name}' args", EvalStage.name)
        else:
            task_args[arg] = value
    chosen = ("system_prompt", "fewshot") if ctx.trial.use_prompt_opt else ()  # prompt_opt's
    missing = [arg for arg in task.required if arg not in task_args and arg not in chosen]
    if missing:
        raise CruijffError(
            f"task '{task.name}': @task {task.function}() requires {missing[0]!r}, which "
            f"nothing gives it: set it in {task.folder / 'eval.yaml'} (`{missing[0]}: ...`), "
            f"in the experiment's eval_config, or per trial as `eval.{missing[0]}` in the "
            "design")
    return {
        "task": task.name,
        "task_file": str(task.eval_file),
        "task_function": task.function,
        "task_args": task_args,
        "data_path": data["data_path"],
        "model": f"hf/{model}",
        "model_args": {"do_sample": False, **(family.eval_model_args if family else {})},
        "generate": dict(family.eval_generate) if family else {},
    }


def _task_arg_settings(ctx: TrialContext) -> list[tuple[str, Any]]:
    """The task arguments the experiment's eval_config and the trial's `eval.*` design keys
    set, in that order, read as EvalStage._set reads them (which reports the other keys)."""
    sources = [EvalStage().overrides(ctx.trial)]
    if ctx.config.eval_config is not None:
        sources.insert(0, load_yaml_mapping(ctx.config.eval_config, "eval_config file"))
    found: list[tuple[str, Any]] = []
    for source in sources:
        for key, value in source.items():
            head, _, rest = str(key).partition(".")
            if head == "task_args" and not rest and isinstance(value, dict):
                pairs = [(str(k), v) for k, v in value.items()]
            elif head == "task_args" and rest:
                pairs = [(rest, value)]
            else:
                pairs = [(head, value)] if not rest and head not in EDITABLE else []
            found += [(arg, v) for arg, v in pairs if ctx.task.has_parameter(arg)]
    return found


def check_prompt_format(ctx: TrialContext, model_args: dict[str, Any]) -> None:
    """The eval asks the fine-tuned model in the format it was trained in: known at once for
    a family's own pairing, compared token by token otherwise (cruijff/prompt_format.py)."""
    tokenizer = ctx.resolve(FinetuneStage()).data.get("tokenizer", {})
    family = ctx.family
    if family is not None and prompt_format.known_pair(tokenizer, model_args, family.tokenizer,
                                                       family.eval_model_args):
        return
    prompt_format.check(ctx.trial.model, tokenizer, ctx.model_path, model_args, ctx.data_path)


def task_factory(config: dict[str, Any]) -> Any:
    """The @task function named by a stage config, with its model known to Inspect (so a
    local model is not loaded a second time just to look up its info)."""
    from inspect_ai.model import ModelInfo, set_model_info

    from cruijff.tasks import load_function, task_imports

    set_model_info(config["model"], ModelInfo(organization="local", model=config["model"]))
    task_file = Path(config["task_file"])
    task_function = load_function(task_file, f"_cruijff_task_{config['task']}_eval",
                                  config["task_function"])
    default_split = _default(task_function, "split")

    def make_task(**args: Any) -> Any:
        try:
            with task_imports(task_file.parent):  # a task importing its own modules lazily
                task = task_function(**args)
        except Exception as exc:  # the task's own code: its error, not cruijff's
            raise CruijffError(f"task '{config['task']}': {config['task_function']}() "
                               f"failed: {type(exc).__name__}: {exc}") from None
        give_ids(task, str(args.get("split") or default_split or config.get("reads_split")
                           or "sample"))
        return task

    return make_task


def _default(function: Any, name: str) -> Any:
    import inspect

    try:
        parameter = inspect.signature(function).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if parameter is None or parameter.default is parameter.empty \
        else parameter.default


def give_ids(task: Any, split: str) -> None:
    """Samples without an id get `<split>-<index>` (their place in the split), not Inspect's
    1..N: stable, and telling which split a sample came from. A task's own ids win."""
    samples = getattr(task, "dataset", None)
    if samples is None:
        return
    for index, sample in enumerate(samples):
        if getattr(sample, "id", 0) is None:
            sample.id = f"{split}-{index}"


@contextmanager
def loadable(config: dict[str, Any], trial_dir: Path, stage: str) -> Iterator[dict[str, Any]]:
    """The model args that load a stage config's model: its weights from `model_path` (the
    config's model), so that Inspect can name the model by its id (inspect_names). A
    fine-tune saved as its adapter alone is merged with its base (cruijff/adapters.py: never
    peft) into `.<stage>-model` in the trial, removed afterwards."""
    checkpoint = Path(str(config["model"]).removeprefix("hf/"))
    if checkpoint_shape(checkpoint) != "adapter":
        yield {"model_path": str(checkpoint), **config["model_args"]}
        return
    source = FinetuneStage().config_path(trial_dir)
    base = LoraBase.from_config(load_yaml_mapping(source, "fine-tune config"), source)
    with merged_model(checkpoint, base, trial_dir / f".{stage}-model") as folder:
        yield {**config["model_args"], "model_path": str(folder)}


STAGE_RUN_ENVIRONMENT = {"stage_key": "CRUIJFF_STAGE_KEY", "attempt": "CRUIJFF_STAGE_ATTEMPT",
                         "run_id": "CRUIJFF_RUN_ID"}
"""What `cruijff run` (runner.execute_stage) tells a stage's process about this run of it,
which the trial's files cannot: its metadata key -> the environment variable."""


@dataclass(frozen=True)
class InspectNames:
    """What a stage's Inspect logs call its run, so that `inspect view` over an experiment
    reads as the experiment does: the model by its id, the trial in tags and metadata."""

    model: str
    """`hf/<model id>`; `hf/<model id>+<trial>` for the trial's fine-tune (`/epoch_<N>`
    added for an earlier checkpoint); the config's own model where it is neither."""
    tags: list[str]
    metadata: dict[str, Any]

    def adding(self, tags: list[str], metadata: dict[str, Any]) -> InspectNames:
        return InspectNames(self.model, [*self.tags, *tags], {**self.metadata, **metadata})


def inspect_names(config: dict[str, Any], trial_dir: Path, stage: str) -> InspectNames:
    """The names of a stage run in its trial (read from the trial's config.yaml) and, under
    `cruijff run`, its key, attempt and run id. A stage run by hand, or a config outside a
    trial, still runs: it is named by what is known."""
    trial: dict[str, Any] = {}
    if (trial_dir / "config.yaml").is_file():
        try:
            trial = load_yaml_mapping(trial_dir / "config.yaml", "trial config")
        except CruijffError:
            trial = {}
    path = str(config["model"]).removeprefix("hf/")
    model_id = _model_id(path, trial, trial_dir)
    metadata: dict[str, Any] = {
        "experiment": trial.get("experiment"), "trial": trial.get("id"),
        "treatment": trial.get("treatment"), "label": trial.get("label"),
        "control": trial.get("control"), "stage": stage,
        "base_model": trial.get("model"), "model_path": path,
    }
    for key, variable in STAGE_RUN_ENVIRONMENT.items():
        metadata[key] = os.environ.get(variable)
    if metadata["attempt"] is not None and str(metadata["attempt"]).isdigit():
        metadata["attempt"] = int(metadata["attempt"])
    # the tags Prefect's runs of it carry (flows/experiment.py), and its treatment
    tagged = {"exp": "experiment", "trial": "trial", "stage": "stage", "attempt": "attempt",
              "treatment": "label"}
    tags = ["cruijff", *(f"{tag}:{metadata[key]}" for tag, key in tagged.items()
                         if metadata[key] is not None)]
    return InspectNames(f"hf/{model_id}" if model_id else str(config["model"]), tags,
                        {k: v for k, v in metadata.items() if v is not None})


def _model_id(path: str, trial: dict[str, Any], trial_dir: Path) -> str | None:
    """The base model's id where the config evaluates the trial's base model; `<id>+<trial>`
    where it evaluates the trial's fine-tune; None for a model the trial does not know."""
    base = trial.get("model")
    if not isinstance(base, str) or not base:
        return None
    where = Path(os.path.abspath(path))
    if trial.get("model_path") and where == Path(os.path.abspath(trial["model_path"])):
        return base
    final = Path(os.path.abspath(trial_dir)) / FINAL_CHECKPOINT
    if where.parent == final.parent and trial.get("id") is not None:
        return f"{base}+{trial['id']}" + ("" if where == final else f"/{where.name}")
    return None


def _log_files(log_dir: Path) -> set[str]:
    from inspect_ai.log import list_eval_logs

    if not log_dir.is_dir():
        return set()
    return {info.name for info in list_eval_logs(str(log_dir), recursive=False)}


@contextmanager
def error_logged(log_dir: Path, config: dict[str, Any], names: InspectNames,
                 limit: int | None) -> Iterator[None]:
    """An eval that fails before Inspect writes its log (the model does not load, the task
    cannot be built) still leaves one, status error, in log_dir: `inspect view` shows every
    failed attempt beside the one that succeeded."""
    before = _log_files(log_dir)
    try:
        yield
    except Exception as exc:
        if not _log_files(log_dir) - before:
            write_error_log(log_dir, config, names, limit, exc)
        raise


def write_error_log(log_dir: Path, config: dict[str, Any], names: InspectNames,
                    limit: int | None, exc: BaseException) -> Path:
    """An Inspect log of status error for an eval that failed before it ran a sample."""
    from inspect_ai.log import (
        EvalConfig,
        EvalDataset,
        EvalError,
        EvalLog,
        EvalSpec,
        write_eval_log,
    )

    created = datetime.now().astimezone().isoformat(timespec="seconds")
    spec = EvalSpec(created=created, task=str(config["task"]), task_file=config["task_file"],
                    task_args=dict(config["task_args"]), dataset=EvalDataset(),
                    model=names.model, model_args={"model_path": names.metadata.get("model_path"),
                                                  **config["model_args"]},
                    config=EvalConfig(limit=limit), tags=names.tags, metadata=names.metadata)
    text = "".join(traceback.format_exception(exc))
    log = EvalLog(eval=spec, status="error", error=EvalError(
        message=f"{type(exc).__name__}: {exc}", traceback=text, traceback_ansi=text))
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = re.sub(r"[:]", "-", created)
    path = log_dir / f"{stamp}_{re.sub(r'[^A-Za-z0-9_.-]', '-', spec.task)}_{spec.eval_id}.eval"
    write_eval_log(log, str(path))
    return path


def eval_throughput(log: Any) -> dict[str, float]:
    """Samples (and model tokens) the eval got through, and how fast, from its log's header:
    the time is the eval's own (started_at to completed_at), not the stage's start-up."""
    figures: dict[str, float] = {}
    samples = log.results.completed_samples if log.results else None
    if samples is not None:
        figures["samples"] = float(samples)
    try:
        seconds = (datetime.fromisoformat(log.stats.completed_at)
                   - datetime.fromisoformat(log.stats.started_at)).total_seconds()
    except (TypeError, ValueError):
        seconds = 0.0
    if seconds > 0:
        figures["eval_s"] = round(seconds, 3)
        if samples:
            figures["samples_per_s"] = round(samples / seconds, 4)
    tokens = sum(usage.total_tokens for usage in log.stats.model_usage.values())
    if tokens:
        figures["model_tokens"] = float(tokens)
    return figures


def log_metrics(log: Any) -> dict[str, Any]:
    """Sample count and every metric of an Inspect log's results."""
    metrics: dict[str, Any] = {"samples": log.results.completed_samples if log.results else 0}
    scores = log.results.scores if log.results else []
    for score in scores:
        for name, metric in score.metrics.items():
            metrics[name if len(scores) == 1 else f"{score.name}/{name}"] = metric.value
    return metrics


DEFAULT_HEADLINE = "first scorer's first metric"
"""What `eval.metric` is when not set (the words every output shows beside it)."""


def describe_headline(name: str, default: bool | None) -> str:
    """How every output names the headline: `match/accuracy (headline; default: first
    scorer's first metric)`; None: a record from before eval.metric (its one scorer's)."""
    how = {True: f"default: {DEFAULT_HEADLINE}", False: "chosen by eval.metric",
           None: "its only scorer's, recorded before eval.metric"}[default]
    return f"{name} (headline; {how})"


def parse_metric(value: Any, source: str) -> str:
    """`eval.metric`: `<scorer>/<metric>` (match/accuracy) or `<metric>` (of the first
    scorer). Only its form is checked at build: a task's scorers are known once it ran."""
    ok = isinstance(value, str) and value.strip() == value and " " not in value
    scorer, slash, metric = value.rpartition("/") if ok else ("", "", "")
    if not ok or not metric or (slash and not scorer):
        raise CruijffError(f"eval key 'metric' ({source}) must be '<scorer>/<metric>' (such "
                           f"as match/accuracy) or '<metric>' (of the first scorer), not "
                           f"{value!r}")
    return str(value)


@dataclass(frozen=True)
class HeadlineMetric:
    """The one metric tables, prompt search and analyze report: `<scorer>/<metric>`."""

    name: str
    value: float | None
    default: bool
    """Not chosen by eval.metric: the first scorer's first metric."""

    @property
    def scorer(self) -> str:
        return self.name.rpartition("/")[0]

    def record(self) -> dict[str, Any]:
        """Its entries in a stage record's metrics (read back by the views and the store)."""
        return {"headline": self.name, "headline_value": self.value,
                "headline_default": self.default}


def scorer_metrics(log: Any) -> dict[str, float | None]:
    """`<scorer>/<metric>` -> value for every metric of every scorer, in the log's order."""
    scores = log.results.scores if log.results else []
    return {f"{score.name}/{name}": None if metric.value is None else float(metric.value)
            for score in scores for name, metric in score.metrics.items()}


def headline_metric(log: Any, choice: str | None) -> HeadlineMetric | None:
    """The headline of an Inspect log: `choice` (eval.metric), else the first scorer's first
    metric; None for a log without metrics when none was chosen. A chosen metric the log does
    not have is a CruijffError naming the ones it has."""
    available = scorer_metrics(log)
    if choice is None:
        first = next(iter(available), None)
        return None if first is None else HeadlineMetric(first, available[first], True)
    name = choice
    if "/" not in choice and log.results and log.results.scores:
        name = f"{log.results.scores[0].name}/{choice}"
    if name not in available:
        raise CruijffError(f"eval.metric {choice!r}: the eval log has no metric {name!r}; it "
                           f"has {', '.join(available) or 'none (the task has no scorer)'}")
    return HeadlineMetric(name, available[name], False)


def _raise_if_import_error(logs: list[Any], task: str) -> None:
    """A scorer or solver whose lazy import failed fails every retry the same way: say so as
    cruijff's own error (deterministic, not retried), naming the module."""
    for log in logs:
        message = log.error.message if log.error else ""
        # Inspect writes `ModuleNotFoundError("No module named 'x'")`, a log `...Error: ...`
        found = re.search(r"\b(ModuleNotFoundError|ImportError)\b(.*)", message)
        if found:
            text = found.group(2).strip().strip(":()").strip().strip("\"")
            raise CruijffError(f"task '{task}': {found.group(1)}: {text} (install it in "
                               "cruijff's environment; see README: a task's extras)")


class EvalStage(Stage):
    name = "eval"
    backend = "inspect-ai"
    headlines = (Headline("headline", "headline_value", ".3f", named_by="headline",
                          fallback="accuracy"),)
    scores = True
    verify_imports = ("inspect_ai.log",)

    def enabled(self, trial: TrialSpec) -> bool:
        return True

    def resolve(self, ctx: TrialContext) -> StageConfig:
        config: dict[str, Any] = {
            **inspect_target(ctx),
            "limit": None,
            "log_dir": str(ctx.trial_dir / "logs" / "eval"),
        }
        if ctx.trial.use_fine_tune:  # which epoch's checkpoint: final (the last) or epoch_<N>
            config["checkpoint"] = Path(FINAL_CHECKPOINT).name
        if ctx.config.eval_config is not None:
            user = load_yaml_mapping(ctx.config.eval_config, "eval_config file")
            for key, value in user.items():
                self._set(config, ctx, str(key), value, f"eval_config {ctx.config.eval_config}")
        for key, value in self.overrides(ctx.trial).items():
            self._set(config, ctx, key, value, "design")
        if ctx.trial.use_fine_tune and FinetuneStage.name in ctx.config.pipeline:
            check_prompt_format(ctx, config["model_args"])
        settle_eval_split(config, ctx)  # the split it reads, as the dataset names it
        return StageConfig(config, self.command(ctx.trial_dir, config, ctx.trial.model))

    def execute(self, config_path: Path) -> int:
        """`cruijff exec eval eval.yaml`: run the task with eval_set semantics (a re-run
        reuses the samples already scored in log_dir and re-executes only failed ones)."""
        from inspect_ai import eval_set

        from cruijff.tasks import task_imports

        config = load_yaml_mapping(config_path, "eval config")
        names = inspect_names(config, config_path.parent, self.name)
        make_task = task_factory({**config, "model": names.model})
        # the task's folder on sys.path while it runs: a scorer may import its modules lazily
        with error_logged(Path(config["log_dir"]), config, names, config["limit"]), \
                loadable(config, config_path.parent, self.name) as model_args, \
                task_imports(Path(config["task_file"]).parent):
            success, logs = eval_set(  # prompt_opt's choice around a task that does not take it
                tasks=[apply_prompt(make_task(**config["task_args"]), config.get("prompt"))],
                log_dir=config["log_dir"],
                model=names.model,
                model_args=model_args,
                tags=names.tags,
                metadata=names.metadata,
                limit=config["limit"],
                display="plain",
                retry_attempts=0,  # cruijff's retries decide (a failure that repeats is not
                retry_cleanup=False,  # retried; a retry re-runs only the failed samples), and
                log_dir_allow_dirty=True,  # every attempt's log stays, as do logs of an
                **config["generate"],  # earlier config: `inspect view` shows them all
            )
        if not success:
            _raise_if_import_error(logs, config["task"])
        return 0 if success else 1

    def artifacts(self, trial_dir: Path, config: dict[str, Any]) -> list[Path]:
        return [Path(config["log_dir"])]

    def verify(self, trial_dir: Path, config: dict[str, Any]) -> Verified:
        """Done only if the newest log in log_dir has status 'success'."""
        from inspect_ai.log import list_eval_logs, read_eval_log

        logs = list_eval_logs(config["log_dir"], recursive=False)
        if not logs:
            raise StageFailed(f"eval wrote no log in {config['log_dir']}")
        newest = max(logs, key=lambda info: info.mtime or 0)
        log = read_eval_log(newest, header_only=True)
        if log.status != "success":
            error = log.error.message.splitlines()[0] if log.error else "no error recorded"
            raise StageFailed(f"eval log status is {log.status}: {error}")
        location = Path(newest.name.removeprefix("file://"))
        metrics = log_metrics(log)
        try:  # eval.metric names a scorer/metric the task's log does not have: one line
            headline = headline_metric(log, config.get("metric"))
        except CruijffError as exc:
            raise StageFailed(str(exc)) from None
        if headline is not None:
            metrics.update(headline.record())
        return Verified([str(location.relative_to(trial_dir))], metrics, eval_throughput(log))

    def _set(self, config: dict[str, Any], ctx: TrialContext, key: str, value: Any,
             source: str) -> None:
        head, _, rest = key.partition(".")
        if head in ("task_args", "model_args", "generate") and not rest:
            if not isinstance(value, dict):
                raise CruijffError(f"{source}: eval key '{head}' must be a mapping")
            for sub, sub_value in value.items():
                self._set(config, ctx, f"{head}.{sub}", sub_value, source)
            return
        if head not in EDITABLE and ctx.task.has_parameter(head) and not rest:
            head, rest = "task_args", head  # shorthand: eval.<task argument>
        if head == "task_args":
            if not ctx.task.has_parameter(rest):
                raise CruijffError(
                    f"eval key 'task_args.{rest}' ({source}): @task {ctx.task.function}() has no "
                    f"argument '{rest}'{did_you_mean(rest, ctx.task.parameters)}"
                )
            if rest in config["task_args"]:
                set_existing(config, f"task_args.{rest}", value,
                             f"task '{ctx.task.name}' args", self.namespace)
            else:
                config["task_args"][rest] = value
        elif head == "model_args" and rest:
            config["model_args"][rest] = value
        elif head == "generate" and rest:
            fields = _generate_fields()
            if rest not in fields:
                raise CruijffError(
                    f"eval key 'generate.{rest}' ({source}): not an Inspect GenerateConfig "
                    f"field{did_you_mean(rest, fields)}"
                )
            config["generate"][rest] = value
        elif head == "checkpoint" and not rest:
            if "checkpoint" not in config:
                raise CruijffError(f"eval key 'checkpoint' ({source}): trial "
                                   f"{ctx.trial.id} does not fine-tune")
            if not isinstance(value, str) or not re.fullmatch(r"final|epoch_\d+", value):
                raise CruijffError(f"eval key 'checkpoint' ({source}) must be 'final' or "
                                   f"'epoch_<N>', not {value!r}")
            config["checkpoint"] = value
            config["model"] = f"hf/{ctx.trial_dir / Path(FINAL_CHECKPOINT).parent / value}"
        elif head == "metric" and not rest:
            config["metric"] = parse_metric(value, source)
        elif head == "limit" and not rest:
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise CruijffError(f"eval key 'limit' ({source}) must be an integer")
            config["limit"] = value
        else:
            raise CruijffError(
                f"unknown eval key '{key}' ({source}){did_you_mean(head, EDITABLE)}: use "
                "task_args.<arg>, model_args.<arg>, generate.<field>, limit, checkpoint, "
                "metric, or a task argument"
            )
