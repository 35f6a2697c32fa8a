"""Inspect task for capitalization: exact (case-sensitive) match of the UPPER-case word."""

from __future__ import annotations

import json
from pathlib import Path

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ChatMessage, ChatMessageAssistant, ChatMessageUser
from inspect_ai.scorer import CORRECT, INCORRECT, Score, Target, accuracy, scorer, stderr
from inspect_ai.solver import TaskState, generate, system_message


def _data_file(data_path: str, data_ext: str) -> Path:
    """data_path is the dataset file, or the same path without its extension."""
    p = Path(data_path)
    if p.is_file():
        return p
    with_ext = p.with_name(f"{p.name}.{data_ext.lstrip('.')}")
    if with_ext.is_file():
        return with_ext
    raise FileNotFoundError(f"capitalization: no data file at {p} or {with_ext}")


@scorer(metrics=[accuracy(), stderr()])
def exact_match():
    """Correct when the output, stripped of surrounding whitespace, equals the target exactly."""

    async def score(state: TaskState, target: Target) -> Score:
        answer = state.output.completion.strip()
        return Score(
            value=CORRECT if answer == target.text.strip() else INCORRECT,
            answer=answer,
        )

    return score


def _prompt(record: dict, fewshot: list[dict] | None) -> str | list[ChatMessage]:
    """The record's input, after the demonstrations (as earlier turns) when there are any."""
    if not fewshot:
        return record["input"]
    turns: list[ChatMessage] = []
    for demo in fewshot:
        turns += [ChatMessageUser(content=demo["input"]),
                  ChatMessageAssistant(content=demo["output"])]
    return [*turns, ChatMessageUser(content=record["input"])]


@task
def capitalization(
    data_path: str,
    data_ext: str = "json",
    split: str = "test",
    system_prompt: str = "",
    fewshot: list[dict] | None = None,
) -> Task:
    """Prompt optimization may set `system_prompt` and `fewshot` (demonstration records
    {id, input, output} from the training split); cruijff passes `split`."""
    if data_ext.lstrip(".") != "json":
        raise ValueError(f"capitalization: only json data is supported, got data_ext={data_ext!r}")
    path = _data_file(data_path, data_ext)
    splits = json.loads(path.read_text())
    if split not in splits:
        raise ValueError(f"capitalization: {path} has no split {split!r} (has {sorted(splits)})")
    samples = [Sample(id=r["id"], input=_prompt(r, fewshot), target=r["output"])
               for r in splits[split]]
    return Task(
        dataset=MemoryDataset(samples, name=f"{path.stem}-{split}"),
        solver=[system_message(system_prompt), generate()] if system_prompt else generate(),
        scorer=exact_match(),
    )
