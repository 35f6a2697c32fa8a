"""A prompt candidate applied around an unchanged Inspect @task, in prompt_opt and in the eval
alike, so the eval measures exactly the prompt the search chose.

A task that takes `system_prompt` or `fewshot` arguments gets them as arguments and keeps
control of how they are used. For a part the task does not take, cruijff builds the task with
its own arguments and puts one solver step before the task's own solver (task_with, never an
edit of the task): the system prompt as a system message (after any the sample already has,
taken literally: no template filling, no file lookup), then each demonstration record as an
earlier user turn (`input`) and assistant turn (`output`), before the sample's own input.
The sample's last user message stays its own, so a task's prompt_template and scorers see
the input they expect.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PARTS = ("system_prompt", "fewshot")
"""The parts of a prompt candidate: a system prompt, and demonstration records."""


def applied_by_cruijff(task_parameters: Iterable[str]) -> list[str]:
    """The parts of a candidate that cruijff applies itself: those the @task does not take
    as named arguments (a task taking only **kwargs would ignore them)."""
    taken = set(task_parameters)
    return [part for part in PARTS if part not in taken]


def split_candidate(args: dict[str, Any], wrapped: Iterable[str]
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A candidate's args as (task arguments, parts cruijff applies around the task)."""
    outside = set(wrapped)
    return ({k: v for k, v in args.items() if k not in outside},
            {k: v for k, v in args.items() if k in outside})


def apply_prompt(task: Any, prompt: dict[str, Any] | None) -> Any:
    """The task with `prompt` ({system_prompt, fewshot}) applied before its own solver; the
    task itself when there is nothing to apply."""
    system_prompt = str((prompt or {}).get("system_prompt") or "")
    fewshot = list((prompt or {}).get("fewshot") or [])
    if not system_prompt and not fewshot:
        return task
    from inspect_ai import task_with

    return task_with(task, solver=[_prompt_step(system_prompt, fewshot), task.solver])


def _prompt_step(system_prompt: str, fewshot: list[dict[str, Any]]) -> Any:
    from inspect_ai.model import ChatMessageAssistant, ChatMessageSystem, ChatMessageUser
    from inspect_ai.solver import Generate, Solver, TaskState, solver

    @solver(name="cruijff_prompt")
    def cruijff_prompt(system_prompt: str = "", fewshot: list[dict[str, Any]] | None = None
                       ) -> Solver:
        async def solve(state: TaskState, generate: Generate) -> TaskState:
            turns: list[Any] = [ChatMessageSystem(content=system_prompt)] if system_prompt \
                else []
            for demo in fewshot or []:  # new messages per sample: each has its own id
                turns += [ChatMessageUser(content=str(demo["input"])),
                          ChatMessageAssistant(content=str(demo["output"]))]
            messages = state.messages
            lead = 0
            while lead < len(messages) and messages[lead].role == "system":
                lead += 1
            state.messages = [*messages[:lead], *turns, *messages[lead:]]
            return state

        return solve

    return cruijff_prompt(system_prompt=system_prompt, fewshot=fewshot)
