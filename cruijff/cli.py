"""The `cruijff` command line: parse, call the core, render with rich.

Errors in the user's input are CruijffError: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import atexit
import errno
import gc
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cruijff import __version__
from cruijff.errors import CruijffError

if TYPE_CHECKING:  # the CLI imports the core lazily, so `--help` stays fast

    from rich.console import Group, RenderableType

    from cruijff.compute import Suggestion
    from cruijff.experiment import BuildRequest, Built
    from cruijff.pipeline import RunPlan
    from cruijff.runner import Experiment, Trial
    from cruijff.stages import Headline
    from cruijff.summary import StageStatus, Summary

Selection = list[tuple["Trial", list[str]]]

app = typer.Typer(
    name="cruijff",
    help="Replicable fine-tuning, prompt-optimization and evaluation experiments.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
model_app = typer.Typer(help="Get models into a model directory.", no_args_is_help=True)
app.add_typer(model_app, name="model")
server_app = typer.Typer(help="The local Prefect server cruijff starts on demand.",
                         no_args_is_help=True)
app.add_typer(server_app, name="server")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _print_version(asked: bool) -> None:
    if asked:
        out.print(f"cruijff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(show_version: Annotated[bool, typer.Option(
        "--version", help="print cruijff's version and exit", callback=_print_version,
        is_eager=True)] = False) -> None:
    """Replicable fine-tuning, prompt-optimization and evaluation experiments."""

ConfigPath = Annotated[
    Path, typer.Option("--config-path", "-c", help="the experiment config.yaml",
                       metavar="FILE")
]
Task = Annotated[str, typer.Option(help="task folder name under tasks_dir", metavar="TASK")]
Datasets = Annotated[list[str] | None, typer.Option(
    "--dataset", help="dataset file name under data_dir (repeatable)", metavar="NAME")]
Models = Annotated[list[str] | None, typer.Option(
    "--model", help="Hugging Face model id org/name, or a model folder (absolute, or ./ or ../ "
    "from the config) (repeatable)", metavar="MODEL")]
Control = Annotated[list[str] | None, typer.Option(
    "--control", help="KEY=VALUE applied to every trial (repeatable)", metavar="KEY=VALUE")]
Controls = Annotated[list[str] | None, typer.Option(
    "--controls", help='controls as a JSON object, e.g. \'{"k": 1}\'', metavar="JSON")]
ControlPath = Annotated[list[Path] | None, typer.Option(
    "--control-path", help="a JSON file holding the controls object", metavar="FILE")]
Treatment = Annotated[list[str] | None, typer.Option(
    "--treatment", help="KEY=VALUE: one treatment per option (repeatable)",
    metavar="KEY=VALUE")]
Treatments = Annotated[list[str] | None, typer.Option(
    "--treatments", help="a JSON object (one treatment) or a list of them; lists expand",
    metavar="JSON")]
TreatmentPath = Annotated[list[Path] | None, typer.Option(
    "--treatment-path", help="a JSON file: a treatment object or a list of them",
    metavar="FILE")]
Name = Annotated[str | None, typer.Option(
    help="experiment name (default: <task>-<date>-<time>)", metavar="NAME")]
Root = Annotated[Path, typer.Option(
    help="experiment root: the experiment is written to <root>/<name>", metavar="DIR")]
JsonFlag = Annotated[bool, typer.Option("--json", help="print the result as JSON")]


def _request(config_path: Path, task: str, *, dataset: list[str] | None,
             model: list[str] | None, control: list[str] | None, controls: list[str] | None,
             control_path: list[Path] | None, treatment: list[str] | None,
             treatments: list[str] | None, treatment_path: list[Path] | None,
             name: str | None, root: Path) -> BuildRequest:
    from cruijff.design import Design
    from cruijff.experiment import BuildRequest

    design = Design.from_options(
        models=model or [], datasets=dataset or [], control=control or [],
        controls=controls or [], control_path=control_path or [], treatment=treatment or [],
        treatments=treatments or [], treatment_path=treatment_path or [],
    )
    return BuildRequest(config_path=config_path, task=task, design=design, root=root, name=name)


TABLE_ROWS = 50
"""A build of more trials prints its first TABLE_HEAD rows and a line on the rest: rendering a
1,000-row table takes a second, and nobody reads it on a terminal."""
TABLE_HEAD = 20


def _trial_counts(rows: list[dict]) -> str:
    """'1000 trials: 2 models × 1 dataset × 500 treatments (2 control trials)'."""
    def count(n: int, word: str) -> str:
        return f"{n} {word}{'s' if n != 1 else ''}"

    controls = sum(1 for row in rows if row["label"] == "control")
    treatments = len({row["label"] for row in rows if row["label"] != "control"})
    return (f"{len(rows)} trials: {count(len({r['model'] for r in rows}), 'model')} × "
            f"{count(len({r['dataset'] for r in rows}), 'dataset')} × "
            f"{count(treatments, 'treatment')} ({count(controls, 'control trial')})")


def _build(request: BuildRequest, *, dry_run: bool, force: bool, as_json: bool,
           verbose: bool = False) -> Built:
    from cruijff.experiment import build_experiment, trial_rows

    built = build_experiment(request, dry_run=dry_run, force=force)
    rows = trial_rows(built)
    if as_json:
        print(json.dumps({"name": built.name, "path": str(built.path), "dry_run": dry_run,
                          "archived": str(built.archived) if built.archived else None,
                          "notices": built.plan.notices, "warnings": built.warnings,
                          "trials": rows}, indent=2))
        return built
    shown = rows if verbose or len(rows) <= TABLE_ROWS else rows[:TABLE_HEAD]
    table = Table(title=f"{built.name}: {len(rows)} trials")
    for column in ("trial", "model", "dataset", "treatment", "control", "stages"):
        table.add_column(column, overflow="fold")
    for row in shown:
        table.add_row(row["id"], Text(row["model"]), Text(row["dataset"]), Text(row["label"]),
                      row["control"] or "-", " → ".join(row["stages"]))
    out.print(table)
    if len(shown) < len(rows):
        out.print(f"… {len(rows) - len(shown)} more; --json or --verbose for all "
                  f"({_trial_counts(rows)})", markup=False, soft_wrap=True)
    for notice in built.plan.notices:
        out.print(f"note: {notice}", markup=False)
    for warning in built.warnings:
        err.print(f"warning: {warning}", markup=False, soft_wrap=True)
    if built.archived:
        out.print(f"Moved the previous experiment to {built.archived}", markup=False)
    if dry_run:
        out.print("Dry run: nothing was written.")
    else:
        out.print(f"Built {built.path}", markup=False)
    return built


@app.command()
def build(
    config_path: ConfigPath,
    task: Task,
    dataset: Datasets = None,
    model: Models = None,
    control: Control = None,
    controls: Controls = None,
    control_path: ControlPath = None,
    treatment: Treatment = None,
    treatments: Treatments = None,
    treatment_path: TreatmentPath = None,
    name: Name = None,
    root: Root = Path("."),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the trials, write nothing")]
    = False,
    force: Annotated[bool, typer.Option(
        "--force", help="rebuild an existing experiment, moving the old one to .archive/")] = False,
    as_json: JsonFlag = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help=f"list every trial (beyond {TABLE_ROWS} the table shows the "
        f"first {TABLE_HEAD})")] = False,
) -> None:
    """Turn a config and controls/treatments into an experiment of trials."""
    request = _request(config_path, task, dataset=dataset, model=model, control=control,
                       controls=controls, control_path=control_path, treatment=treatment,
                       treatments=treatments, treatment_path=treatment_path, name=name, root=root)
    _build(request, dry_run=dry_run, force=force, as_json=as_json, verbose=verbose)


STATUS_STYLE = {"done": "green", "reused": "green", "skipped": "green", "failed": "red",
                "running": "yellow", "pending": "dim", "interrupted": "red", "blocked": "dim",
                "outdated": "yellow", "damaged": "yellow"}


def _results(selection: Selection, *, held: bool) -> tuple[Table, list[dict], bool]:
    """Trials x stages as runner.trial_states sees them, with each stage's headline metrics
    (accuracy, final loss)."""
    from cruijff.registry import STAGES
    from cruijff.runner import trial_states
    from cruijff.summary import in_run_order

    stages = in_run_order([trial_stages for _, trial_stages in selection])
    # The outcome first (the eval's headline metric), then how it came about (the final loss).
    headlines = [(stage, h) for stage in reversed(stages) for h in STAGES[stage].headlines]
    table_rows: list[tuple[str, Text, list[str], dict[str, Any]]] = []
    rows, all_done = [], True
    for trial, trial_stages in selection:
        states = trial_states(trial, trial_stages, held=held)
        all_done &= all(state.is_done for state in states.values())
        values = {h.key: _headline_value(h, states[stage].record.metrics
                                         if stage in states and states[stage].record else {})
                  for stage, h in headlines}
        cells = []
        for stage in stages:
            state = states.get(stage)
            if state is None:
                cells.append("")
                continue
            record = state.record
            text = state.state if state.state != "reused" else f"reused {record.reused_from}"
            if record and record.duration_s is not None and state.state != "reused":
                text += f" {record.duration_s:.0f}s"
            cells.append(f"[{STATUS_STYLE.get(state.state, 'default')}]{text}[/]")
        table_rows.append((trial.id, Text(trial.label), cells, values))
        errors = {s: state.record.error for s, state in states.items()
                  if state.state in ("failed", "interrupted") and state.record
                  and state.record.error}
        rows.append({"id": trial.id, "label": trial.label, **values,
                     "stages": {s: state.state for s, state in states.items()},
                     **({"errors": errors} if errors else {})})
    table = Table(title="trials")
    columns, captions = [], []
    for _, h in headlines:
        column, caption = _headline_column(h, [values[h.key] for *_, values in table_rows])
        columns.append(column)
        captions += [caption] if caption else []
    for column in ("trial", "treatment", *stages, *columns):
        table.add_column(column, overflow="fold")
    for trial_id, label, cells, values in table_rows:
        table.add_row(trial_id, label, *cells,
                      *(_headline_cell(h, values[h.key], named=columns[i] == h.column)
                        for i, (_, h) in enumerate(headlines)))
    table.caption = "; ".join(captions) or None
    return table, rows, all_done


def _headline_value(headline: Headline, metrics: dict[str, Any]) -> Any:
    """A trial's headline as `run --json` gives it: the value, or for a metric the user picks
    (eval.metric) {"metric": "match/accuracy", "value": 0.5, "default": true}."""
    if headline.named_by is None:
        return metrics.get(headline.metric)
    name = metrics.get(headline.named_by)
    if name is None and headline.fallback in metrics:  # a record from before eval.metric
        return {"metric": headline.fallback, "value": metrics[headline.fallback],
                "default": None}
    if name is None:
        return None
    return {"metric": name, "value": metrics.get(headline.metric),
            "default": metrics.get(f"{headline.named_by}_default")}


def _headline_column(headline: Headline, values: list[Any]) -> tuple[str, str]:
    """The column's header and the table's caption line: the metric's own name when every
    trial has the same one (`match/accuracy`), saying whether it is the default."""
    from cruijff.stages.eval import describe_headline

    if headline.named_by is None:
        return headline.column, ""
    named = {(v["metric"], v["default"]) for v in values if isinstance(v, dict)}
    if len(named) == 1:
        name, default = named.pop()
        return name, describe_headline(name, default)
    if not named:
        return headline.column, ""
    return headline.column, (f"{headline.column}: differs between trials (each cell names "
                             "its scorer/metric)")


def _headline_cell(headline: Headline, value: Any, *, named: bool) -> str:
    """The value; `named`: with its scorer/metric (the column does not say which it is)."""
    if isinstance(value, dict):
        number = value["value"]
        shown = "-" if number is None else format(number, headline.format)
        return f"{shown} {value['metric']}" if named else shown
    return "-" if value is None else format(value, headline.format)


def _print_failures(rows: list[dict], experiment: Path) -> None:
    """One line per failed stage, read from its record: the same whether the run was here or
    on a served deployment (whose process printed nothing here)."""
    for row in rows:
        for stage, error in row.get("errors", {}).items():
            last = error.strip().splitlines()[-1] if error.strip() else "no error recorded"
            err.print(f"trial {row['id']} {stage} {row['stages'][stage]}: {last}",
                      markup=False, soft_wrap=True)
    if any("errors" in row for row in rows):
        err.print(f"(`cruijff summary {experiment}` shows each failure's last lines and log)",
                  markup=False, soft_wrap=True)


@app.command()
def run(
    experiment: Annotated[Path | None, typer.Argument(
        help="the experiment folder; or give build options to build one first",
        metavar="EXPERIMENT")] = None,
    stage: Annotated[str | None, typer.Option(
        help="run only this stage: finetune, prompt_opt, eval", metavar="STAGE")] = None,
    trials: Annotated[str | None, typer.Option(
        help="only these trials, e.g. a,b,c", metavar="IDS")] = None,
    failed: Annotated[bool, typer.Option(
        "--failed", help="only trials with a failed (or interrupted) stage")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="re-run the selected stages even if done; old outputs go to .archive/")]
    = False,
    executor: Annotated[str | None, typer.Option(
        help="local or slurm (default: orchestration.executor)", metavar="EXECUTOR")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="show what would run (for slurm: the worker job scripts)")] = False,
    local: Annotated[bool, typer.Option(
        "--local", help="run in this process even when a served deployment could run it")]
    = False,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="through a deployment: wait for the run to finish")] = True,
    workers: Annotated[int | None, typer.Option(
        help="local Dask workers (default: orchestration.workers, else one per core)",
        min=1)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no live progress")] = False,
    as_json: JsonFlag = False,
    config_path: Annotated[Path | None, typer.Option(
        "--config-path", "-c", help="build first: the experiment config.yaml",
        metavar="FILE")] = None,
    task: Annotated[str | None, typer.Option(help="build first: the task",
                                             metavar="TASK")] = None,
    dataset: Datasets = None,
    model: Models = None,
    control: Control = None,
    controls: Controls = None,
    control_path: ControlPath = None,
    treatment: Treatment = None,
    treatments: Treatments = None,
    treatment_path: TreatmentPath = None,
    name: Name = None,
    root: Root = Path("."),
) -> None:
    """Run an experiment's trials: skip done stages, run the rest, show what happened.

    Runs through the served experiment deployment when there is one (see `cruijff serve`),
    else in this process. Exit code 0 when every selected stage is done, 1 when any failed."""
    from cruijff.pipeline import RunPlan, experiment_to_run

    if experiment is None:
        if config_path is None or task is None:
            raise CruijffError("give an experiment folder, or --config-path and --task to build "
                               "one first (see cruijff run --help)")
        request = _request(config_path, task, dataset=dataset, model=model, control=control,
                           controls=controls, control_path=control_path, treatment=treatment,
                           treatments=treatments, treatment_path=treatment_path, name=name,
                           root=root)
        experiment, force = experiment_to_run(
            request, force, lambda r, f: _build(r, dry_run=False, force=f, as_json=False).path)
    elif config_path is not None or task is not None:
        raise CruijffError("give either an experiment folder or build options, not both")

    plan = RunPlan.make(experiment, stage=stage, trials=trials, failed=failed, force=force,
                        executor=executor, workers=workers)
    if plan.note:
        out.print(plan.note, markup=False)
        return
    if dry_run:
        _dry_run(plan)
        return
    plan.check_startable()
    exp = plan.experiment
    if not plan.todo():
        table, rows, _ = _results(plan.selection, held=False)
        if as_json:
            print(json.dumps({"experiment": exp.name, "ran": False, "trials": rows}))
        else:
            out.print(table)
            out.print(f"Experiment {exp.name} is already complete: nothing to run "
                      "(--force re-runs).", markup=False)
        return
    ok = _launch(plan, local=local, wait=wait, quiet=quiet or as_json)
    if ok is None:  # triggered without waiting
        return
    from cruijff.runner import STOP

    table, rows, all_done = _results(plan.selection, held=False)
    if as_json:
        print(json.dumps({"experiment": exp.name, "ran": True, "stopped": STOP.is_set(),
                          "trials": rows}))
    else:
        out.print(table)
        _print_failures(rows, exp.path)
    if STOP.is_set():
        err.print(f"Stopped: running stages were ended and recorded as interrupted; finished "
                  f"ones are kept. `cruijff run {exp.path}` resumes.", markup=False,
                  soft_wrap=True)
        raise typer.Exit(130)
    if not (ok and all_done):
        raise typer.Exit(1)


def _dry_run(plan: RunPlan) -> None:
    todo = plan.todo()
    out.print(f"Would run {len(todo)} stage(s) of {plan.experiment.name} on {plan.executor}: "
              + ", ".join(f"{t.id}/{s}" for t, s in todo), markup=False)
    if plan.executor == "slurm":
        from cruijff.flows.clusters import job_scripts

        for profile, script in job_scripts(plan.experiment,
                                           [t for t, _ in plan.selection]).items():
            out.rule(f"worker job script: {profile}")
            out.print(script, markup=False, highlight=False)


def _launch(plan: RunPlan, *, local: bool, wait: bool, quiet: bool) -> bool | None:
    """Run the plan through Prefect, showing the trials table live. True/False: every
    selected stage succeeded or not; None: triggered on a deployment, not awaited."""
    from rich.live import Live

    from cruijff.deployments.launch import connect, launch
    from cruijff.slurm import QueueWatcher

    exp = plan.experiment
    with err.status("Starting the Prefect server ..."):
        server = connect()
    err.print(f"Prefect UI: {server.ui_url}  (runs tagged exp:{exp.name})", markup=False)
    started = launch(plan, server, local=local)
    if started.flow_run is not None:
        err.print(f"Triggered deployment run {started.flow_run}: "
                  f"{server.ui_url}/runs/flow-run/{started.flow_run}", markup=False)
        if not wait:
            out.print(str(started.flow_run))
            return None
    if quiet:
        return started.run()
    watcher = QueueWatcher(exp.name) if plan.executor == "slurm" else None
    with Live(get_renderable=lambda: _with_waits(_results(plan.selection, held=True)[0],
                                                 watcher and watcher.note()),
              console=err, refresh_per_second=1, transient=True):
        return started.run()




@app.command()
def summary(
    experiment: Annotated[Path, typer.Argument(help="the experiment folder")],
    trials: Annotated[str | None, typer.Option(help="only these trials, e.g. a,b",
                                               metavar="IDS")] = None,
    stage: Annotated[str | None, typer.Option(help="only this stage", metavar="STAGE")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Did the pipeline run smoothly? Each trial and stage: state, attempts, time, where it
    ran (Slurm job and state), the last lines of any error, and what it used of what its job
    asked for (memory, time: ▽ under 25 %, ▲ over 90 %; OUT_OF_MEMORY / TIMEOUT at a figure).

    Exit code 0 when every selected stage is done, 1 otherwise."""
    from cruijff.runner import load_experiment, select
    from cruijff.settings import CruijffSettings
    from cruijff.summary import summarize

    exp = load_experiment(experiment)
    result = summarize(exp, select(exp, trials, stage))
    from cruijff.flows.server import running_api

    api = running_api(CruijffSettings().home)
    flow_states: dict[str, str] = {}
    if api is None:  # Prefect (and its import) only when a server answers
        result.notices.append("The Prefect server is not running: this summary is from disk "
                              "(and Slurm) only.")
    else:
        from cruijff.flows.status import prefect_view
        from cruijff.runner import unlocked

        flow_states, notice = prefect_view(
            api, exp.name, unheld=None if result.running else (lambda: unlocked(exp)),
            names={exp.name, *(f"{exp.name}/trial-{t.id}" for t in result.trials)})
        if notice:
            result.notices.append(notice)
    for trial in result.trials:
        trial.prefect = flow_states.get(f"{exp.name}/trial-{trial.id}")
    if as_json:
        print(json.dumps(result.to_json()))  # one line, as every --json output
    else:
        _print_summary(result, flow_states.get(exp.name))
    if not result.complete:
        raise typer.Exit(1)


def _print_summary(result: Summary, last_run: str | None) -> None:
    from cruijff.summary import in_run_order

    stages = in_run_order([list(t.stages) for t in result.trials])
    table = Table(title=f"{result.experiment}: {'running' if result.running else 'not running'}"
                  + (f", last run {last_run}" if last_run else ""))
    table.add_column("trial")
    table.add_column("treatment", overflow="fold")
    for stage in stages:
        table.add_column(stage, overflow="fold")
    compute = {trial.id: _compute_cell(trial.stages) for trial in result.trials}
    if any(compute.values()):  # records from before usage was measured: no empty column
        table.add_column("compute", overflow="fold")
    table.add_column("prefect")
    failures = []
    for trial in result.trials:
        cells = []
        for stage in stages:
            status = trial.stages.get(stage)
            if status is None:
                cells.append("")
                continue
            text = f"[{STATUS_STYLE.get(status.state, 'default')}]{status.state}[/]"
            if status.attempts > 1:
                text += f" ×{status.attempts}"
            if status.duration_s is not None:
                text += f" {status.duration_s:.0f}s"
            if status.slurm and status.state in ("done", "running"):
                text += f"\nslurm job {status.slurm[-1].split(':')[0]}"  # worker job: ends
            elif status.slurm:  # cancelled by cruijff when the work is done, so its state
                text += "\nslurm " + ", ".join(status.slurm)  # matters only for failures
            elif status.where:
                text += f"\n{status.where.split(':')[0] if ':' in status.where else status.where}"
            cells.append(text)
            if status.error:
                failures.append((trial.id, stage, status.state, status.error))
        if any(compute.values()):
            cells.append(compute[trial.id])
        table.add_row(trial.id, Text(trial.label), *cells, trial.prefect or "-")
    out.print(table)
    for trial_id, stage, state, error in failures:  # unwrapped: lines get copied and grepped
        out.print(f"[red]trial {trial_id} {stage} {state}:[/]", soft_wrap=True)
        out.print("\n".join(f"  {line}" for line in error.splitlines()), markup=False,
                  soft_wrap=True)
    if headline := result.headline_text():
        out.print(headline, markup=False, soft_wrap=True)
    for notice in result.notices:
        out.print(f"note: {notice}", markup=False, soft_wrap=True)


def _compute_cell(stages: dict[str, StageStatus]) -> str:
    """A line per stage: what it used of what it asked for (`finetune 3.1/8G 39% · 4m/30m
    13% ▽`), and each attempt Slurm ended for memory or time, in red with the figure it
    reached."""
    from rich.markup import escape

    from cruijff.utilization import compute_text

    lines = []
    for stage, status in stages.items():
        for use in status.compute_earlier:
            if use.outcome:
                attempt = use.attempt or "?"
                lines.append(f"[red]{escape(f'{stage} #{attempt} {compute_text(use)}')}[/]")
        use = status.compute
        if use is None or not (use.measured or use.outcome or use.asked):
            continue
        line = escape(f"{stage} {compute_text(use)}")
        lines.append(f"[red]{line}[/]" if use.outcome else line)
    return "\n".join(lines)


@app.command()
def analyze(
    experiment: Annotated[Path, typer.Argument(help="the experiment folder")],
    output: Annotated[Path | None, typer.Option(
        help="report folder (default: <experiment>/report)", metavar="DIR")] = None,
    format: Annotated[str, typer.Option(
        "--format", help="report files to write: any of md,html,csv (or none)",
        metavar="FORMATS")] = "md,html,csv",
    database_url: Annotated[str | None, typer.Option(
        help="results store (default: CRUIJFF_DATABASE_URL, else <experiment>/results.sqlite)",
        metavar="URL")] = None,
    as_json: JsonFlag = False,
) -> None:
    """How well did the models do? Each trial's metric with a 95% CI; each treatment against
    its control on the same samples (McNemar / paired bootstrap, Holm-adjusted); final loss and
    wall time; a report folder (report.md, self-contained report.html with plots, results.csv).
    Works on a partly finished experiment: it analyzes what is done and names the rest."""
    from cruijff.report import analysis_table
    from cruijff.report import analyze as run_analysis

    formats = {f.strip() for f in format.split(",") if f.strip() and f.strip() != "none"}
    with err.status("Loading results ..."):
        analysis = run_analysis(experiment, output=output, formats=formats,
                                database_url=database_url)
    if as_json:
        print(analysis.to_json())
        return
    out.print(analysis_table(analysis))
    for missing in analysis.missing:
        out.print(f"[yellow]no results:[/] {missing.describe()}", highlight=False)
    if analysis.files:
        out.print(f"Report: {', '.join(str(f) for f in analysis.files)}", markup=False)


@app.command("resources")
def resources_command(
    experiment: Annotated[Path, typer.Argument(help="the experiment to suggest profiles for")],
    root: Annotated[list[Path] | None, typer.Option(
        "--root", help="also learn from every experiment in this folder (repeatable)",
        metavar="DIR")] = None,
    store: Annotated[bool, typer.Option(
        "--store", help="also learn from the results store (CRUIJFF_DATABASE_URL)")] = False,
    quantile: Annotated[float, typer.Option(
        help="the quantile of what runs used that a suggestion covers")] = 0.95,
    memory_margin: Annotated[float, typer.Option(
        help="memory suggested: the quantile × this")] = 1.25,
    time_margin: Annotated[float, typer.Option(
        help="time suggested: the quantile × this, rounded up to 5 minutes")] = 1.5,
    min_runs: Annotated[int, typer.Option(
        help="no suggestion from fewer runs of a model × stage")] = 5,
    apply: Annotated[bool, typer.Option(
        "--apply", help="write the suggestions into the experiment's config (resources.<model>"
        ".stages.<stage>), showing the diff first and archiving the old file")] = False,
    config: Annotated[Path | None, typer.Option(
        "--config", help="with --apply: the config to edit (default: the one the experiment "
        "was built from)", metavar="FILE")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="with --apply: do not ask")] = False,
    as_json: JsonFlag = False,
) -> None:
    """What should each model × stage ask Slurm for? From the recorded stage runs of the
    experiment (and of --root / --store): memory and time as a high quantile of what runs
    used × a margin, time scaled to this experiment's size, GPUs as the most a run used."""
    from cruijff.compute import Policy, gather, plan_apply, read_target, suggest_all
    from cruijff.config_edit import write_edit
    from cruijff.settings import CruijffSettings

    if (config is not None or yes) and not apply:
        raise CruijffError("--config and --yes go with --apply")
    if apply and as_json and not yes:
        raise CruijffError("--apply with --json needs --yes (there is no one to ask)")
    policy = Policy(quantile, memory_margin, time_margin, min_runs)
    target = read_target(experiment)
    url = CruijffSettings().database_url if store else None
    if store and not url:
        raise CruijffError("--store reads the results store CRUIJFF_DATABASE_URL names: set it")
    history = gather([target.path], root or [], store=url)
    suggestions = suggest_all(target, history, policy)
    edit = None
    if apply:
        path = config or target.config_path
        if path is None:
            raise CruijffError(f"{target.path} does not say which config it was built from: "
                               "give it with --config")
        edit = plan_apply(path, suggestions)
    if as_json:
        applied = None
        if edit is not None:
            archived = write_edit(edit) if edit.changes else None
            applied = {"config": str(edit.path), "changed": bool(edit.changes),
                       "archived": str(archived) if archived else None}
        print(json.dumps({"experiment": target.name, "policy": policy.__dict__,
                          "experiments": history.experiments, "runs": len(history.runs),
                          "suggestions": [s.to_dict() for s in suggestions],
                          "applied": applied}, indent=2))
        return
    out.print(_suggestions_table(target.name, suggestions, history.experiments))
    for suggestion in suggestions:
        lines = [f"no suggestion: {suggestion.refused}"] if suggestion.refused else []
        for note in lines + ([suggestion.basis] if suggestion.basis else []) + suggestion.notes:
            out.print(f"{suggestion.key}/{suggestion.stage}: {note}", markup=False,
                      soft_wrap=True)
    if edit is None:
        return
    if not edit.changes:
        out.print(f"{edit.path} already asks for what is suggested: nothing to change.",
                  markup=False)
        return
    out.print(edit.diff(), markup=False, highlight=False, end="")
    if not yes and not typer.confirm(f"Write this into {edit.path}?", default=False):
        out.print("Nothing written.")
        return
    archived = write_edit(edit)
    out.print(f"Wrote {edit.path} (the old one is at {archived}): rebuild the experiment to "
              "use it (cruijff build ... --force).", markup=False, soft_wrap=True)


def _suggestions_table(name: str, suggestions: list[Suggestion], experiments: int) -> Table:
    """Model × stage: runs, and what is asked now → what is suggested."""
    table = Table(title=f"{name}: suggested resources (from {experiments} experiment"
                  f"{'s' if experiments != 1 else ''})")
    for column in ("model", "stage", "runs", "mem", "time", "gres"):
        table.add_column(column, overflow="fold")
    for s in suggestions:
        if s.refused:
            table.add_row(Text(s.key), s.stage, str(s.runs),
                          Text("no suggestion", style="yellow"), "", "")
            continue
        asked = s.asked

        def cell(now: object, new: object, unit: str = "") -> Text:
            shown = "-" if now is None else f"{now}{unit}"
            if new is None:
                return Text(shown)
            return Text(f"{shown} → {new}{unit}", style="bold" if str(now) != str(new) else "")

        table.add_row(Text(s.key), s.stage, str(s.runs),
                      cell(asked.get("mem"), s.mem, "G"), cell(asked.get("time"), s.time),
                      cell(asked.get("gres"), s.gres))
    return table


@app.command()
def progress(
    experiment: Annotated[Path, typer.Argument(help="the experiment folder")],
    watch: Annotated[bool, typer.Option(
        "--watch/--no-watch", help="follow a running experiment until it ends")] = True,
    interval: Annotated[float, typer.Option(help="seconds between updates", min=0.2)] = 1.0,
) -> None:
    """Watch an experiment run: stages done out of all, per trial, with elapsed time and an
    estimate of the time left; on a finished experiment, its final state once."""
    import time

    from rich.live import Live

    from cruijff.runner import load_experiment, select, unlocked
    from cruijff.slurm import QueueWatcher

    exp = load_experiment(experiment)
    selection = select(exp)
    start = time.monotonic()
    watcher = QueueWatcher(exp.name)
    if not watch or unlocked(exp):
        held = not unlocked(exp)
        out.print(_with_waits(_progress_view(exp, selection, None, held=held),
                              watcher.ask() if held else None))
        return
    with Live(_progress_view(exp, selection, 0.0, held=True), console=out,
              refresh_per_second=4) as live:
        while not unlocked(exp):
            time.sleep(interval)
            live.update(_with_waits(_progress_view(exp, selection, time.monotonic() - start,
                                                   held=True), watcher.note()))
        live.update(_progress_view(exp, selection, time.monotonic() - start, held=False))


def _with_waits(view: RenderableType, note: str | None) -> RenderableType:
    """The view, with the line on waiting Slurm jobs under it when there is one."""
    from rich.console import Group

    return Group(view, Text(note, style="yellow")) if note else view


def _progress_view(exp: Experiment, selection: Selection, elapsed: float | None, *,
                   held: bool) -> Group:
    from rich.console import Group
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cruijff.runner import trial_states

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[note]}"))
    total_done, total, durations, running = 0, 0, [], 0
    rows = []
    for trial, stages in selection:
        states = trial_states(trial, stages, held=held)
        done = sum(1 for state in states.values() if state.is_done)
        rows.append((f"trial {trial.id}", done, len(stages),
                     ", ".join(f"{s} {state.state}" for s, state in states.items())))
        total_done, total = total_done + done, total + len(stages)
        durations += [state.record.duration_s for state in states.values()
                      if state.is_done and state.record and state.record.duration_s]
        running += sum(1 for state in states.values() if state.state == "running")
    left = total - total_done
    eta = ""
    if elapsed is not None and durations and left:
        lanes = max(1, running)
        eta = f"about {sum(durations) / len(durations) * left / lanes:.0f}s left"
    clock = f"{elapsed:.0f}s elapsed" if elapsed is not None else "finished" if not left else ""
    bars.add_task(f"[bold]{exp.name}", total=total, completed=total_done,
                  note=" · ".join(x for x in (clock, eta) if x))
    for description, done, count, states in rows:
        bars.add_task(description, total=count, completed=done, note=states)
    return Group(bars)


@app.command()
def serve() -> None:
    """Serve the experiment and re-run deployments from this process (until Ctrl-C), so
    `cruijff run` and scheduled re-runs go through Prefect deployments."""
    from cruijff.flows.server import ensure_api
    from cruijff.settings import CruijffSettings

    info = ensure_api(CruijffSettings().home)
    err.print(f"Serving cruijff deployments on {info.ui_url} (Ctrl-C stops)", markup=False)
    from cruijff.deployments.serve import serve as serve_deployments

    serve_deployments()


@app.command()
def deploy(
    pool: Annotated[str, typer.Option(help="a Prefect process work pool (created if missing)",
                                      metavar="NAME")],
) -> None:
    """Register the deployments on a work pool; run `prefect worker start --pool NAME` on the
    machine that should execute them (e.g. an HPC login or service node)."""
    from cruijff.flows.server import ensure_api
    from cruijff.settings import CruijffSettings

    info = ensure_api(CruijffSettings().home)
    from cruijff.deployments.serve import deploy as deploy_deployments

    ids = deploy_deployments(pool)
    out.print(f"Registered {len(ids)} deployments on pool {pool!r} at {info.url}. Start a "
              f"worker where experiments should run: prefect worker start --pool {pool}",
              markup=False)


@app.command("schedule-reruns")
def schedule_reruns(
    experiment: Annotated[Path, typer.Argument(help="the experiment folder")],
    cron: Annotated[str | None, typer.Option(
        help="when to re-run failed trials, e.g. '*/30 * * * *'", metavar="CRON")] = None,
    off: Annotated[bool, typer.Option("--off", help="remove the schedule")] = False,
) -> None:
    """Re-run an experiment's failed trials on a schedule (only their unfinished stages)."""
    if (cron is None) == (not off):
        raise CruijffError("give --cron EXPRESSION, or --off to remove the schedule")
    from cruijff.cron import cron_problem

    problem = cron and cron_problem(cron)
    if problem:  # before anything is touched: the old schedule stays
        raise CruijffError(f"--cron {cron!r}: {problem}")
    from cruijff.flows.server import ensure_api
    from cruijff.settings import CruijffSettings

    ensure_api(CruijffSettings().home)
    from cruijff.deployments.serve import schedule_reruns as apply

    out.print(apply(str(experiment), None if off else cron), markup=False)


@server_app.command("start")
def server_start(
    database_url: Annotated[str | None, typer.Option(
        help="a PostgreSQL URL (postgresql+asyncpg://...) instead of SQLite")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: a free one, then kept)")]
    = None,
) -> None:
    """Start the local Prefect server (on 127.0.0.1) if it is not running; print its address."""
    from cruijff.flows.server import start_server
    from cruijff.settings import CruijffSettings

    with err.status("Starting the Prefect server ..."):
        settings = CruijffSettings()
        info = start_server(settings.home, database_url=database_url
                            or settings.server_database_url, port=port)
    out.print(f"Prefect server running: UI {info.ui_url}, API {info.url} (pid {info.pid}, "
              f"database {info.database})", markup=False)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local Prefect server."""
    from cruijff.flows.server import stop_server
    from cruijff.settings import CruijffSettings

    stopped = stop_server(CruijffSettings().home)
    out.print("Prefect server stopped." if stopped else "No cruijff Prefect server was running.")


@server_app.command("status")
def server_status(as_json: JsonFlag = False) -> None:
    """Is the local Prefect server running? Exit code 0 if it is, 1 if not."""
    from cruijff.flows.server import server_status as status
    from cruijff.settings import CruijffSettings

    info = status(CruijffSettings().home)
    if as_json:
        print(json.dumps(None if info is None else info.__dict__))
    elif info is None:
        out.print("No cruijff Prefect server is running (it starts with `cruijff run` or "
                  "`cruijff server start`).")
    else:
        out.print(f"Prefect server running: UI {info.ui_url}, API {info.url} (pid {info.pid}, "
                  f"database {info.database})", markup=False)
    if info is None:
        raise typer.Exit(1)


@model_app.command("get")
def model_get(
    model_id: Annotated[str, typer.Argument(help="e.g. cruijff/tiny-llama or org/name")],
    model_dir: Annotated[Path, typer.Option(help="where models live")],
) -> None:
    """Materialize a cruijff tiny model, or download a Hugging Face model, into model_dir
    (a model already there or in the Hugging Face cache is used where it is)."""
    from cruijff.models import ensure_model
    from cruijff.settings import CruijffSettings

    with err.status(f"Preparing {model_id} ..."):
        path = ensure_model(model_id, model_dir.resolve(), CruijffSettings())
    out.print(f"{model_id}: {path}", markup=False)


@app.command("exec", hidden=True)
def exec_stage(
    stage: Annotated[str, typer.Argument(help="stage name")],
    config: Annotated[Path, typer.Argument(help="the stage's config file")],
) -> None:
    """Run one stage from its config file (what the flow and the .slurm scripts call). An
    error it raises is also reported as deterministic or transient, for the retry loop."""
    from cruijff.registry import STAGES

    try:
        code = STAGES[stage].execute(config)
    except Exception as exc:
        from cruijff.attempts import report_failure

        report_failure(exc)
        raise
    raise typer.Exit(code)


@app.command("stage", hidden=True)
def stage_by_hand(
    trial_dir: Annotated[Path, typer.Argument(help="the trial folder")],
    stage: Annotated[str, typer.Argument(help="stage name")],
) -> None:
    """Run one stage of one trial as `cruijff run` does and record it (what `<stage>.slurm`
    runs). Exit 0 when it is done, 1 when it failed, 2 when it cannot start."""
    from cruijff.by_hand import outcome_line, run_stage

    record = run_stage(trial_dir, stage,
                       say=lambda line: out.print(line, markup=False, soft_wrap=True))
    if record is not None and not record.is_done:
        err.print(outcome_line(trial_dir.name.removeprefix("trial-"), record), markup=False,
                  soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print cruijff's version."""
    out.print(f"cruijff {__version__}")


DISK_ERRORS = {
    errno.EACCES: "make it writable for you, or choose another folder",
    errno.EPERM: "make it writable for you, or choose another folder",
    errno.EROFS: "it is on a read-only file system: choose a writable folder",
    errno.ENOSPC: "the disk is full: free space (or move the experiment) and run again",
    errno.EDQUOT: "your disk quota is used up: free space and run again",
}
"""File-system errors a user can fix: one line, exit 2, like any other bad input."""


def _show_plugin_warnings() -> None:
    """A plugin that cannot be used (cruijff.registry) is one `warning:` line, not a
    Python warning with its file and line."""
    import warnings

    from cruijff.registry import PluginWarning

    shown = warnings.showwarning
    if getattr(shown, "cruijff", False):
        return

    def show(message: Warning | str, category: type[Warning], *args: object,
             **kwargs: object) -> None:
        if issubclass(category, PluginWarning):
            err.print(f"warning: {message}", markup=False, soft_wrap=True)
        else:
            shown(message, category, *args, **kwargs)  # type: ignore[arg-type]

    show.cruijff = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line and exit code 2."""
    # At exit, after the handlers registered from here on (Prefect's log and event drains
    # among them), every object made so far is kept out of the interpreter's final garbage
    # collections: walking what Prefect, Dask, pydantic and torch made took 1.2-1.4 s of
    # each run's exit (py-spy). By then every file is closed and every record written.
    atexit.register(gc.freeze)
    # Prefect's SDK telemetry off in cruijff's processes and their children (Dask workers,
    # the server): no usage events from a researcher's runs; a DO_NOT_TRACK set is kept.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    _show_plugin_warnings()
    try:
        app(args=argv, prog_name="cruijff")
    except CruijffError as exc:
        err.print(f"error: {exc}", markup=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            _internal_error(exc)
        where = f": {exc.filename}" if exc.filename else ""
        err.print(f"error: {exc.strerror}{where}: {DISK_ERRORS[exc.errno]}", markup=False,
                  soft_wrap=True)
        sys.exit(2)
    except Exception as exc:
        _internal_error(exc)


def _internal_error(exc: Exception) -> NoReturn:
    if os.environ.get("CRUIJFF_DEBUG"):
        raise exc
    err.print(f"internal error: {type(exc).__name__}: {exc} (set CRUIJFF_DEBUG=1 for the "
              "traceback, and please report it)", markup=False, soft_wrap=True)
    sys.exit(1)
