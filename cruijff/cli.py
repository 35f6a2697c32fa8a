"""The `cruijff` command line: parse, call the core, render with rich.

Errors in the user's input are CruijffError: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cruijff import __version__
from cruijff.errors import CruijffError

if TYPE_CHECKING:  # the CLI imports the core lazily, so `--help` stays fast
    import logging

    from rich.console import Group, RenderableType

    from cruijff.experiment import BuildRequest, Built
    from cruijff.runner import Experiment, Trial
    from cruijff.state import StageRecord
    from cruijff.summary import Summary

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

ConfigPath = Annotated[
    Path, typer.Option("--config-path", "-c", help="the experiment config.yaml",
                       metavar="FILE")
]
Task = Annotated[str, typer.Option(help="task folder name under tasks_dir", metavar="TASK")]
Datasets = Annotated[list[str] | None, typer.Option(
    "--dataset", help="dataset file name under data_dir (repeatable)", metavar="NAME")]
Models = Annotated[list[str] | None, typer.Option(
    "--model", help="Hugging Face model id org/name (repeatable)", metavar="MODEL")]
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


def _build(request: BuildRequest, *, dry_run: bool, force: bool, as_json: bool) -> Built:
    from cruijff.experiment import build_experiment, trial_rows

    built = build_experiment(request, dry_run=dry_run, force=force)
    rows = trial_rows(built)
    if as_json:
        print(json.dumps({"name": built.name, "path": str(built.path), "dry_run": dry_run,
                          "archived": str(built.archived) if built.archived else None,
                          "notices": built.plan.notices, "trials": rows}, indent=2))
        return built
    table = Table(title=f"{built.name}: {len(rows)} trials")
    for column in ("trial", "model", "dataset", "treatment", "control", "stages"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["id"], Text(row["model"]), Text(row["dataset"]), Text(row["label"]),
                      row["control"] or "-", " → ".join(row["stages"]))
    out.print(table)
    for notice in built.plan.notices:
        out.print(f"note: {notice}", markup=False)
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
) -> None:
    """Turn a config and controls/treatments into an experiment of trials."""
    request = _request(config_path, task, dataset=dataset, model=model, control=control,
                       controls=controls, control_path=control_path, treatment=treatment,
                       treatments=treatments, treatment_path=treatment_path, name=name, root=root)
    _build(request, dry_run=dry_run, force=force, as_json=as_json)


STATUS_STYLE = {"done": "green", "reused": "green", "skipped": "green", "failed": "red",
                "running": "yellow", "pending": "dim", "interrupted": "red"}


def _stage_cells(records: dict[str, StageRecord | None], stages: list[str]) -> list[str]:
    cells = []
    for stage in stages:
        record = records.get(stage)
        status = record.status if record else "pending"
        text = status if status != "reused" else f"reused {record.reused_from}"
        if record and record.duration_s is not None and status != "reused":
            text += f" {record.duration_s:.0f}s"
        cells.append(f"[{STATUS_STYLE.get(status, 'default')}]{text}[/]")
    return cells


def _results(selection: Selection) -> tuple[Table, list[dict], bool]:
    """Trials x stages from the records on disk, with each trial's score and final loss."""
    from cruijff.state import read_record

    stages = list(dict.fromkeys(s for _, trial_stages in selection for s in trial_stages))
    table = Table(title="trials")
    for column in ("trial", "treatment", *stages, "accuracy", "final loss"):
        table.add_column(column, overflow="fold")
    rows, all_done = [], True
    for trial, trial_stages in selection:
        records = {s: read_record(trial.dir, s) for s in trial.stages}
        all_done &= all(records[s] is not None and records[s].is_done for s in trial_stages)
        accuracy = (records.get("eval") and records["eval"].metrics.get("accuracy"))
        loss = (records.get("finetune") and records["finetune"].metrics.get("loss_last"))
        cells = [c if s in trial_stages else "" for s, c in
                 zip(stages, _stage_cells(records, stages), strict=True)]
        table.add_row(trial.id, Text(trial.label), *cells,
                      "-" if accuracy is None else f"{accuracy:.3f}",
                      "-" if loss is None else f"{loss:.4f}")
        rows.append({"id": trial.id, "label": trial.label, "accuracy": accuracy,
                     "final_loss": loss,
                     "stages": {s: (records[s].status if records[s] else "pending")
                                for s in trial_stages}})
    return table, rows, all_done


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
    from cruijff.runner import (
        check_writable,
        load_experiment,
        pending,
        select,
        unfinished_trials,
        unlocked,
    )

    if executor not in (None, "local", "slurm"):
        raise CruijffError(f"--executor must be local or slurm, not {executor!r}")
    if experiment is None:
        if config_path is None or task is None:
            raise CruijffError("give an experiment folder, or --config-path and --task to build "
                               "one first (see cruijff run --help)")
        from cruijff.experiment import matching_experiment

        request = _request(config_path, task, dataset=dataset, model=model, control=control,
                           controls=controls, control_path=control_path, treatment=treatment,
                           treatments=treatments, treatment_path=treatment_path, name=name,
                           root=root)
        experiment = None if force else matching_experiment(request)
        if experiment is None:  # new, changed, or --force: build it (again)
            experiment = _build(request, dry_run=False, force=force, as_json=False).path
            force = False
    elif config_path is not None or task is not None:
        raise CruijffError("give either an experiment folder or build options, not both")

    exp = load_experiment(experiment)
    if failed:
        if trials is not None:
            raise CruijffError("--failed picks the trials itself: drop --trials")
        trials = ",".join(t.id for t in unfinished_trials(exp)) or None
        if trials is None:
            out.print(f"Experiment {exp.name} has no failed trials.")
            return
    selection = select(exp, trials, stage)
    if not selection:
        raise CruijffError(f"nothing selected: no trial of {exp.name} has stage {stage!r}")
    if not unlocked(exp):
        raise CruijffError(f"experiment {exp.name} is already being run: wait for it to finish "
                           "or stop it first")
    if not dry_run:
        check_writable(exp)
    executor = executor or exp.orchestration.executor
    if dry_run:
        _dry_run(exp, selection, executor, force)
        return
    if not force and not pending(selection):
        table, rows, _ = _results(selection)
        if as_json:
            print(json.dumps({"experiment": exp.name, "ran": False, "trials": rows}))
        else:
            out.print(table)
            out.print(f"Experiment {exp.name} is already complete: nothing to run "
                      "(--force re-runs).", markup=False)
        return
    parameters = {"experiment": str(exp.path), "stage": stage, "trials": trials,
                  "workers": workers, "executor": executor, "force": force}
    ok = _run_flow(exp, selection, parameters, local=local, wait=wait, quiet=quiet or as_json)
    if ok is None:  # triggered without waiting
        return
    from cruijff.runner import STOP

    table, rows, all_done = _results(selection)
    if as_json:
        print(json.dumps({"experiment": exp.name, "ran": True, "stopped": STOP.is_set(),
                          "trials": rows}))
    else:
        out.print(table)
    if STOP.is_set():
        err.print(f"Stopped: running stages were ended and recorded as interrupted; finished "
                  f"ones are kept. `cruijff run {exp.path}` resumes.", markup=False,
                  soft_wrap=True)
        raise typer.Exit(130)
    if not (ok and all_done):
        raise typer.Exit(1)


def _dry_run(exp: Experiment, selection: Selection, executor: str, force: bool) -> None:
    from cruijff.runner import pending

    todo = [(t, s) for t, stages in selection for s in stages] if force else pending(selection)
    out.print(f"Would run {len(todo)} stage(s) of {exp.name} on {executor}: "
              + ", ".join(f"{t.id}/{s}" for t, s in todo), markup=False)
    if executor == "slurm":
        from cruijff.flows.clusters import job_scripts

        for profile, script in job_scripts(exp, [t for t, _ in selection]).items():
            out.rule(f"worker job script: {profile}")
            out.print(script, markup=False, highlight=False)


def _run_flow(exp: Experiment, selection: Selection, parameters: dict, *, local: bool,
              wait: bool, quiet: bool) -> bool | None:
    """Start (or find) the Prefect server; trigger the served deployment, or run the flow
    here. True/False: every selected stage succeeded or not; None: triggered, not awaited."""
    from rich.live import Live

    from cruijff.settings import CruijffSettings

    for handler in ("CONSOLE", "CONSOLE_FLOW_RUNS", "CONSOLE_TASK_RUNS"):
        os.environ.setdefault(f"PREFECT_LOGGING_HANDLERS_{handler}_LEVEL", "WARNING")
    # Prefect's background services log each event they could not send while its server is
    # away; a lost server ends the run with cruijff's own line instead.
    os.environ.setdefault("PREFECT_INTERNAL_LOGGING_LEVEL", "CRITICAL")
    from cruijff.flows.server import ensure_api

    with err.status("Starting the Prefect server ..."):
        info = ensure_api(CruijffSettings().home)
    err.print(f"Prefect UI: {info.ui_url}  (runs tagged exp:{exp.name})", markup=False)
    from cruijff.deployments.client import served_experiment_deployment, trigger, wait_for

    deployment = None if local else served_experiment_deployment()
    if deployment is not None:
        flow_run = trigger(deployment, parameters, exp.name)
        err.print(f"Triggered deployment run {flow_run}: {info.ui_url}/runs/flow-run/{flow_run}",
                  markup=False)
        if not wait:
            out.print(str(flow_run))
            return None
        work = lambda: wait_for(flow_run)  # noqa: E731
    else:
        from cruijff.flows.experiment import run_experiment

        work = lambda: run_experiment(**parameters)  # noqa: E731
    _without_cruijff_errors_on_console()
    try:
        if quiet:
            return work()
        waits = _SlurmWaits(exp.name) if parameters.get("executor") == "slurm" else None
        with Live(get_renderable=lambda: _with_waits(_results(selection)[0], waits),
                  console=err, refresh_per_second=1, transient=True):
            return work()
    except Exception as exc:
        if not _server_lost(exc):
            raise
        raise CruijffError(
            f"lost the Prefect server at {info.url} during the run ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no answer'}); stages that finished "
            f"are recorded on disk: `cruijff server start`, then `cruijff run {exp.path}` "
            "resumes") from None


def _server_lost(exc: BaseException) -> bool:
    """The Prefect API stopped answering (after the client's own retries)."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(exc, PrefectHTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


SUMMARY_STYLE = {**STATUS_STYLE, "interrupted": "red", "blocked": "dim", "outdated": "yellow",
                 "damaged": "yellow"}


@app.command()
def summary(
    experiment: Annotated[Path, typer.Argument(help="the experiment folder")],
    trials: Annotated[str | None, typer.Option(help="only these trials, e.g. a,b",
                                               metavar="IDS")] = None,
    stage: Annotated[str | None, typer.Option(help="only this stage", metavar="STAGE")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Did the pipeline run smoothly? Each trial and stage: state, attempts, time, where it
    ran (Slurm job and state), and the last lines of any error.

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
            api, exp.name, unheld=None if result.running else (lambda: unlocked(exp)))
        if notice:
            result.notices.append(notice)
    for trial in result.trials:
        trial.prefect = flow_states.get(f"{exp.name}/trial-{trial.id}")
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_summary(result, flow_states.get(exp.name))
    if not result.complete:
        raise typer.Exit(1)


def _print_summary(result: Summary, last_run: str | None) -> None:
    stages = list(dict.fromkeys(s for t in result.trials for s in t.stages))
    table = Table(title=f"{result.experiment}: {'running' if result.running else 'not running'}"
                  + (f", last run {last_run}" if last_run else ""))
    table.add_column("trial")
    table.add_column("treatment", overflow="fold")
    for stage in stages:
        table.add_column(stage, overflow="fold")
    table.add_column("prefect")
    failures = []
    for trial in result.trials:
        cells = []
        for stage in stages:
            status = trial.stages.get(stage)
            if status is None:
                cells.append("")
                continue
            text = f"[{SUMMARY_STYLE.get(status.state, 'default')}]{status.state}[/]"
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
        table.add_row(trial.id, Text(trial.label), *cells, trial.prefect or "-")
    out.print(table)
    for trial_id, stage, state, error in failures:  # unwrapped: lines get copied and grepped
        out.print(f"[red]trial {trial_id} {stage} {state}:[/]", soft_wrap=True)
        out.print("\n".join(f"  {line}" for line in error.splitlines()), markup=False,
                  soft_wrap=True)
    for notice in result.notices:
        out.print(f"note: {notice}", markup=False, soft_wrap=True)


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

    exp = load_experiment(experiment)
    selection = select(exp)
    start = time.monotonic()
    waits = _SlurmWaits(exp.name)
    if not watch or unlocked(exp):
        out.print(_with_waits(_progress_view(exp, selection, None),
                              None if unlocked(exp) else waits.ask()))
        return
    with Live(_progress_view(exp, selection, 0.0), console=out, refresh_per_second=4) as live:
        while not unlocked(exp):
            time.sleep(interval)
            live.update(_with_waits(_progress_view(exp, selection, time.monotonic() - start),
                                    waits))
        live.update(_progress_view(exp, selection, time.monotonic() - start))


def _without_cruijff_errors_on_console() -> None:
    """Prefect logs an exception that ends a flow with its traceback; for a CruijffError (e.g.
    no Slurm job can be submitted) the CLI prints the one line itself, so Prefect's console
    handlers drop it (the Prefect UI keeps the full record)."""
    import logging

    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs", *_NOISY_WITHOUT_SERVER):
        for handler in logging.getLogger(name).handlers:  # "": the root
            if isinstance(handler, logging.StreamHandler) and _not_cruijff_error not in \
                    handler.filters:
                handler.addFilter(_not_cruijff_error)
    logging.raiseExceptions = False  # Prefect's API log handler writes its failures to stderr


_NOISY_WITHOUT_SERVER = ("prefect.events.clients", "EventsWorker", "APILogWorker")
"""Without its server, Prefect's event client warns about every reconnect and its queue
services (loggers named by class) that items are still waiting at exit; the run ends with
cruijff's own line about the lost server instead."""


def _not_cruijff_error(record: logging.LogRecord) -> bool:
    """Drop errors the CLI reports itself: cruijff's, and a lost Prefect server."""
    if record.name.startswith(_NOISY_WITHOUT_SERVER) and record.levelno < logging.CRITICAL:
        return False
    if not record.exc_info or record.exc_info[1] is None:
        return True
    return not (isinstance(record.exc_info[1], CruijffError) or _server_lost(record.exc_info[1]))


class _SlurmWaits:
    """Why an experiment's Slurm worker jobs wait (drained node, no resources ...), for views
    that refresh: squeue is asked in a background thread at most every `every_s` s (it takes
    ~10 s to fail when the controller is down), and the last answer is shown meanwhile."""

    def __init__(self, experiment: str, every_s: float = 5.0) -> None:
        import threading

        self.experiment, self.every_s = experiment, every_s
        self.last: str | None = None
        self._asked = float("-inf")
        self._busy = threading.Lock()

    def ask(self) -> str | None:
        """Ask squeue now: 'waiting for Slurm: 2 jobs PENDING (reason)', or None."""
        from cruijff.slurm import slurm_waits

        self.last = slurm_waits(self.experiment)[1]
        return self.last

    def note(self) -> str | None:
        import threading
        import time

        if time.monotonic() - self._asked >= self.every_s and self._busy.acquire(False):
            self._asked = time.monotonic()

            def refresh() -> None:
                try:
                    self.ask()
                finally:
                    self._busy.release()

            threading.Thread(target=refresh, daemon=True).start()
        return self.last


def _with_waits(view: RenderableType, waits: _SlurmWaits | str | None) -> RenderableType:
    """The view, with the line on waiting Slurm jobs under it when there is one."""
    from rich.console import Group
    from rich.text import Text

    note = waits.note() if isinstance(waits, _SlurmWaits) else waits
    return Group(view, Text(note, style="yellow")) if note else view


def _progress_view(exp: Experiment, selection: Selection, elapsed: float | None) -> Group:
    from rich.console import Group
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cruijff.state import read_record

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[note]}"))
    total_done, total, durations, running = 0, 0, [], 0
    rows = []
    for trial, stages in selection:
        records = [read_record(trial.dir, s) for s in stages]
        done = sum(1 for r in records if r is not None and r.is_done)
        states = ", ".join(f"{s} {r.status if r else 'pending'}"
                           for s, r in zip(stages, records, strict=True))
        rows.append((f"trial {trial.id}", done, len(stages), states))
        total_done, total = total_done + done, total + len(stages)
        durations += [r.duration_s for r in records if r and r.is_done and r.duration_s]
        running += sum(1 for r in records if r is not None and r.status == "running")
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
    """Materialize a cruijff tiny model, or download a Hugging Face model, into model_dir."""
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
    """Run one stage from its config file (what the flow and the .slurm scripts call)."""
    from cruijff.stages import STAGES

    if stage not in STAGES:
        raise CruijffError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    raise typer.Exit(STAGES[stage].execute(config))


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


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line and exit code 2."""
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
