"""The `cruijff` command line: parse, call the core, render with rich.

Errors in the user's input are CruijffError: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cruijff import __version__
from cruijff.errors import CruijffError

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

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ConfigPath = Annotated[
    Path, typer.Option("--config-path", "-c", help="the experiment config.yaml")
]
Repeated = Annotated[list[str] | None, typer.Option()]


@app.command()
def build(
    config_path: ConfigPath,
    task: Annotated[str, typer.Option(help="task folder name under tasks_dir")],
    dataset: Annotated[
        list[str] | None, typer.Option(help="dataset file name under data_dir (repeatable)")
    ] = None,
    model: Annotated[
        list[str] | None, typer.Option(help="Hugging Face model id, e.g. org/name (repeatable)")
    ] = None,
    control: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE applied to every trial (repeatable)")
    ] = None,
    controls: Annotated[
        list[str] | None, typer.Option(help='controls as a JSON object, e.g. \'{"k": 1}\'')
    ] = None,
    control_path: Annotated[
        list[Path] | None, typer.Option(help="a JSON file holding the controls object")
    ] = None,
    treatment: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE: one treatment per option (repeatable)")
    ] = None,
    treatments: Annotated[
        list[str] | None,
        typer.Option(help="a JSON object (one treatment) or list of objects; lists expand"),
    ] = None,
    treatment_path: Annotated[
        list[Path] | None, typer.Option(help="a JSON file: a treatment object or a list of them")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="experiment name (default: <task>-<date>-<time>)")
    ] = None,
    root: Annotated[
        Path, typer.Option(help="experiment root: the experiment is written to <root>/<name>")
    ] = Path("."),
    dry_run: Annotated[bool, typer.Option(help="print the trials and write nothing")] = False,
    force: Annotated[
        bool, typer.Option(help="rebuild an existing experiment, moving the old one to .archive/")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Turn a config and controls/treatments into an experiment of trials."""
    from cruijff.design import Design
    from cruijff.experiment import BuildRequest, build_experiment, trial_rows

    design = Design.from_options(
        models=model or [], datasets=dataset or [], control=control or [],
        controls=controls or [], control_path=control_path or [], treatment=treatment or [],
        treatments=treatments or [], treatment_path=treatment_path or [],
    )
    request = BuildRequest(config_path=config_path, task=task, design=design, root=root,
                           name=name)
    built = build_experiment(request, dry_run=dry_run, force=force)
    rows = trial_rows(built)
    if as_json:
        print(json.dumps({"name": built.name, "path": str(built.path), "dry_run": dry_run,
                          "archived": str(built.archived) if built.archived else None,
                          "notices": built.plan.notices, "trials": rows}, indent=2))
        return
    table = Table(title=f"{built.name}: {len(rows)} trials")
    for column in ("trial", "model", "dataset", "treatment", "control", "stages"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["id"], row["model"], row["dataset"], row["label"],
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
    except Exception as exc:
        if os.environ.get("CRUIJFF_DEBUG"):
            raise
        err.print(f"internal error: {type(exc).__name__}: {exc} (set CRUIJFF_DEBUG=1 for the "
                  "traceback, and please report it)", markup=False, soft_wrap=True)
        sys.exit(1)
