"""Prompt optimizers: given the candidate space and a way to score a candidate (the task's own
Inspect @task on the validation split), return the scored candidates. The built-in search
needs no network; another optimizer (e.g. DSPy against an OpenAI-compatible endpoint) is one
new file here plus its line in cruijff/registry.py."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Candidate:
    number: int
    args: dict[str, Any]
    """Prompt arguments of the @task: system_prompt, fewshot, ..."""
    label: str


@dataclass(frozen=True)
class Scored:
    candidate: Candidate
    score: float
    samples: int
    sample_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SearchSpace:
    system_prompts: list[str]
    fewshot_sets: list[list[dict[str, Any]]]
    """Demonstration sets drawn from the training split; [] is the zero-shot set."""
    max_candidates: int


class PromptOptimizer(ABC):
    name: ClassVar[str]

    @abstractmethod
    def optimize(self, space: SearchSpace,
                 evaluate: Callable[[Candidate], Scored]) -> list[Scored]:
        """Score candidates (at most space.max_candidates) and return them all."""
