"""Scores from Inspect eval logs: every scorer's value per sample, as plain rows.

Apart from the store so that a reader of one log (the run's Prefect artifacts) needs neither
SQLAlchemy nor the store's tables; the store reads many logs through read_logs.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def as_text(value: Any) -> str | None:
    return None if value is None else str(value)


def as_number(value: Any) -> float | None:
    """A finite float, or None (bools count as 0/1; anything else non-numeric is None)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        x = float(value)
        return x if math.isfinite(x) else None
    return None


@dataclass(frozen=True)
class LogScores:
    """What the store reads from an eval log: every scorer's per-sample rows."""

    scorers: dict[str, str]
    """A results scorer's name -> its sample rows' name (`<scorer>/<key>` for a key of a
    scorer whose value is a dict)."""
    default: str | None
    """The first scorer's first metric: the headline where eval.metric chose none."""
    rows: list[dict[str, Any]]


def read_logs(paths: list[Path]) -> list[LogScores | BaseException]:
    """read_scores for many logs, in one event loop (Inspect's sync readers start one per
    call, which costs more than reading a small log)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_read_logs_async(paths))
    results: list[LogScores | BaseException] = []
    for log in paths:  # inside a running loop (a notebook): Inspect's sync readers nest
        try:
            results.append(read_scores(log))
        except Exception as exc:
            results.append(exc)
    return results


async def _read_logs_async(paths: list[Path]) -> list[LogScores | BaseException]:
    limit = asyncio.Semaphore(8)

    async def one(log: Path) -> LogScores | BaseException:
        async with limit:
            try:
                return await read_scores_async(log)
            except Exception as exc:
                return exc

    return list(await asyncio.gather(*(one(log) for log in paths)))


def read_scores(log_path: Path) -> LogScores:
    """Every scorer's sample rows of a successful Inspect log (see _score_rows)."""
    from inspect_ai.log import read_eval_log, read_eval_log_sample_summaries

    if not log_path.is_file():
        raise FileNotFoundError("the log file is missing")
    header = read_eval_log(str(log_path), header_only=True)
    summaries = (read_eval_log_sample_summaries(str(log_path))
                 if header.status == "success" else [])
    return _score_rows(header, summaries)


async def read_scores_async(log_path: Path) -> LogScores:
    from inspect_ai.log import read_eval_log_async, read_eval_log_sample_summaries_async

    if not log_path.is_file():
        raise FileNotFoundError("the log file is missing")
    header = await read_eval_log_async(str(log_path), header_only=True)
    summaries = (await read_eval_log_sample_summaries_async(str(log_path))
                 if header.status == "success" else [])
    return _score_rows(header, summaries)


def _score_rows(header: Any, summaries: list[Any]) -> LogScores:
    """Every scorer's value per sample (a dict value as one scorer per key); CORRECT/INCORRECT
    and the like become numbers with Inspect's value_to_float (C=1, I=0, P=0.5, N=0). Samples
    that errored (no scores) are left out. Only a log whose status is success counts."""
    from inspect_ai.scorer import value_to_float

    if header.status != "success":
        raise ValueError(f"log status is {header.status}, not success")
    results = header.results.scores if header.results else []
    scorers = {s.name: s.name if s.name == s.scorer else f"{s.scorer}/{s.name}"
               for s in results}
    default = next((f"{s.name}/{m}" for s in results for m in s.metrics), None)
    to_float = value_to_float()
    rows: list[dict[str, Any]] = []
    for sample in summaries:
        if sample.error or not sample.scores:
            continue
        target = sample.target if isinstance(sample.target, str) else "\n".join(sample.target)
        for scorer, score in sample.scores.items():
            values = (score.value.items() if isinstance(score.value, dict)
                      else [(None, score.value)])
            for key, value in values:
                if isinstance(value, list | tuple) or value is None:
                    continue
                number = as_number(to_float(value))
                if number is None:
                    continue
                rows.append({
                    "scorer": scorer if key is None else f"{scorer}/{key}",
                    "sample_id": str(sample.id), "epoch": int(sample.epoch), "score": number,
                    "answer": as_text(score.answer), "target": target,
                })
    return LogScores(scorers, default, rows)
