"""Check and report the experiment scripts/gpu-check.sh ran: did every stage of every trial
run on the device it was given, and what did it cost.

    python scripts/gpu_check.py EXPERIMENT --device cuda|cpu --peaks FOLDER

Per trial and stage it prints the wall time (`cruijff summary --json`: the stage record's
duration_s), the peak GPU memory and the tokens per second, then one line per failed check.
Exit code 0 when every check passed, 1 when one failed.

What says where a stage ran (all must agree with --device):
- fine-tune: `device` in the trial's finetune.yaml; torchtune's DiskLogger step lines
  (trial-*/logs/finetune/log_*.txt), which carry `peak_memory_alloc` only when the recipe
  ran on an accelerator (with log_peak_memory_stats, which gpu-check.sh sets); and the
  process's own CUDA record (below).
- eval: `device` in the model_args Inspect recorded in its log (what the hf provider was
  given); and the eval process's own CUDA record.
- The CUDA record: cruijff records no GPU memory, so gpu-check.sh puts
  scripts/lib/cuda_peak/sitecustomize.py on PYTHONPATH, and each stage process writes, at its
  exit, whether it used CUDA and torch.cuda.max_memory_allocated(). A stage that allocated
  no CUDA memory did not run on the GPU, whatever its config said.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

GIB = 1024**3
STEP_VALUES = re.compile(r"(\w+):([-+0-9.eE]+|nan|inf)")
PRECISION = re.compile(r"Model is initialized with precision (torch\.\w+)")
INIT_PEAK = re.compile(r"GPU peak memory allocation: ([0-9.]+) GiB")
NOTES = """\
wall: the stage's duration_s in its record (`cruijff summary --json`): process start to exit.
peak GPU memory: torch.cuda.max_memory_allocated(). Fine-tune: the largest of torchtune's
  logged peak_memory_alloc (after model init, then per step: it resets the peak each step)
  and the process's value at exit. Eval: the eval process's value at its exit (recorded by
  scripts/lib/cuda_peak/sitecustomize.py on PYTHONPATH; cruijff itself records none).
tokens/s: fine-tune: torchtune's tokens_per_second_per_gpu, the median over its steps.
  Eval: the output tokens Inspect counted / the time its log gives the evaluation
  (started_at to completed_at: the model was loaded before)."""


@dataclass
class Row:
    trial: str
    model: str
    stage: str
    wall_s: float | None = None
    device: str = "?"
    peak_bytes: float | None = None
    tokens_per_s: float | None = None
    tokens_note: str = ""
    problems: list[str] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--peaks", type=Path, required=True,
                        help="the folder the stage processes wrote their CUDA records to")
    args = parser.parse_args(argv)
    experiment = args.experiment.resolve()

    summary = stage_summary(experiment)
    records = process_records(args.peaks)
    rows = []
    for trial in summary["trials"]:
        trial_dir = experiment / f"trial-{trial['id']}"
        model = read_yaml(trial_dir / "config.yaml").get("model", "?")
        for stage, status in trial["stages"].items():
            row = Row(trial["id"], model, stage, wall_s=status.get("duration_s"))
            if status["state"] != "done":
                error = (status.get("error") or "").splitlines()[:1]
                row.problems.append(": ".join([f"state is {status['state']}", *error]))
            record = records.get((str(trial_dir), stage))
            if stage == "finetune":
                check_finetune(row, trial_dir, record, args.device)
            elif stage == "eval":
                check_eval(row, trial_dir, record, args.device)
            rows.append(row)

    print_table(rows)
    print(NOTES)
    problems = [f"trial {r.trial} ({r.model}) {r.stage}: {p}" for r in rows for p in r.problems]
    if not rows:
        problems.append(f"no trial stages in {experiment}")
    for problem in problems:
        print(f"FAILED {problem}")
    if problems:
        print(f"gpu-check: {len(problems)} check(s) failed: not every stage ran on {args.device}")
        return 1
    print(f"gpu-check: OK: all {len(rows)} stages ran on {args.device}")
    return 0


def stage_summary(experiment: Path) -> dict[str, Any]:
    """`cruijff summary --json` (its exit code is 1 when a stage is not done: still read)."""
    done = subprocess.run([sys.executable, "-m", "cruijff", "summary", "--json",
                           str(experiment)], capture_output=True, text=True)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        sys.exit(f"gpu-check: `cruijff summary --json {experiment}` gave no JSON "
                 f"(exit {done.returncode}): {done.stderr.strip()[-500:]}")


def process_records(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The stage processes' CUDA records by (trial folder, stage): a stage runs in its
    trial's folder; the fine-tune is torchtune's recipe, the eval `cruijff exec eval`. When a
    stage ran more than once, its last record."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
        record = json.loads(path.read_text(encoding="utf-8"))
        config = record.get("argv", [""])[-1]
        stage = ("finetune" if config.endswith("/finetune.yaml") else
                 "eval" if config.endswith("/eval.yaml") else None)
        if stage and "cwd" in record:
            found[(record["cwd"], stage)] = record
    return found


def check_finetune(row: Row, trial_dir: Path, record: dict[str, Any] | None,
                   device: str) -> None:
    config = read_yaml(trial_dir / "finetune.yaml")
    if config.get("device") != device:
        row.problems.append(f"finetune.yaml has device {config.get('device')!r}")
    steps = step_lines(trial_dir / "logs" / "finetune")
    speeds = [s["tokens_per_second_per_gpu"] for s in steps if "tokens_per_second_per_gpu" in s]
    if speeds:
        row.tokens_per_s = statistics.median(speeds)
        row.tokens_note = f"median of {len(speeds)} steps"
    else:
        row.problems.append("torchtune logged no steps with tokens_per_second_per_gpu")
    attempt_log = newest(trial_dir / "logs", "finetune-attempt*.log")
    text = attempt_log.read_text(encoding="utf-8", errors="replace") if attempt_log else ""
    precision = PRECISION.search(text)
    logged_peaks = [s["peak_memory_alloc"] * GIB for s in steps if "peak_memory_alloc" in s]
    logged_peaks += [float(m) * GIB for m in INIT_PEAK.findall(text)]
    row.device = describe(record, precision.group(1) if precision else None)
    row.peak_bytes = max([*logged_peaks, *cuda_bytes(record)], default=None)
    if device == "cuda" and not logged_peaks:
        row.problems.append("torchtune logged no GPU memory (it does only when it runs on an "
                            "accelerator): it did not run on the GPU")
    if device == "cpu" and logged_peaks:
        row.problems.append("torchtune logged GPU memory: it ran on an accelerator")
    check_record(row, record, device)


def check_eval(row: Row, trial_dir: Path, record: dict[str, Any] | None, device: str) -> None:
    from inspect_ai.log import read_eval_log

    from cruijff.state import read_record

    done = read_record(trial_dir, "eval")
    if done is None or not done.outputs:
        row.problems.append("no verified Inspect log")
        return
    log = read_eval_log(str(trial_dir / done.outputs[0]), header_only=True)
    model_args = log.eval.model_args or {}
    if not str(model_args.get("device", "")).startswith(device):
        row.problems.append(f"Inspect's log has model_args device {model_args.get('device')!r}")
    row.device = describe(record, model_args.get("dtype"))
    row.peak_bytes = max(cuda_bytes(record), default=None)
    output_tokens = sum(u.output_tokens for u in log.stats.model_usage.values())
    seconds = seconds_between(log.stats.started_at, log.stats.completed_at)
    if output_tokens and seconds:
        row.tokens_per_s = output_tokens / seconds
        row.tokens_note = f"{output_tokens} out / {seconds:.1f}s"
    check_record(row, record, device)


def check_record(row: Row, record: dict[str, Any] | None, device: str) -> None:
    """The process's own word: did it allocate CUDA memory?"""
    if record is None:
        row.problems.append("its process left no CUDA record (was scripts/lib/cuda_peak on "
                            "PYTHONPATH, and did the process exit normally?)")
        return
    if "error" in record:
        row.problems.append(f"reading its CUDA memory failed: {record['error']}")
    allocated = max(cuda_bytes(record), default=0)
    if device == "cuda" and not allocated:
        row.problems.append("its process allocated no CUDA memory: it did not run on the GPU")
    if device == "cpu" and allocated:
        row.problems.append(f"its process allocated {allocated / GIB:.3f} GiB of CUDA memory")


def cuda_bytes(record: dict[str, Any] | None) -> list[float]:
    if record and record.get("cuda") and record.get("max_memory_allocated") is not None:
        return [float(record["max_memory_allocated"])]
    return []


def describe(record: dict[str, Any] | None, precision: Any) -> str:
    """Where the process ran, as its CUDA record says, and in what precision."""
    where = "?" if record is None else "cpu" if not cuda_bytes(record) else \
        f"cuda ({record.get('device', '?')})"
    return f"{where}, {str(precision).removeprefix('torch.')}" if precision else where


def step_lines(log_dir: Path) -> list[dict[str, float]]:
    """torchtune's DiskLogger lines of its newest log: 'Step 3 | loss:1.2 lr:0.01 ...'."""
    log = newest(log_dir, "log_*.txt")
    if log is None:
        return []
    return [{k: float(v) for k, v in STEP_VALUES.findall(line)}
            for line in log.read_text(encoding="utf-8").splitlines()
            if line.startswith("Step ")]


def newest(folder: Path, pattern: str) -> Path | None:
    return max(folder.glob(pattern), key=lambda p: p.stat().st_mtime, default=None)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError:
        return {}


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def print_table(rows: list[Row]) -> None:
    header = ("trial", "model", "stage", "ran on", "wall", "peak GPU mem", "tokens/s")
    lines = [header] + [(
        r.trial, r.model, r.stage, r.device,
        "-" if r.wall_s is None else f"{r.wall_s:.1f}s",
        "-" if r.peak_bytes is None else f"{r.peak_bytes / GIB:.3f} GiB",
        "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f} ({r.tokens_note})",
    ) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(cells).rstrip())


if __name__ == "__main__":
    sys.exit(main())
