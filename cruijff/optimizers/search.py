"""The built-in optimizer: every (system prompt, demonstration set) pair, in order, within the
candidate budget; the best validation score wins, ties going to the earlier candidate."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from cruijff.optimizers import Candidate, PromptOptimizer, Scored, SearchSpace


class GridSearch(PromptOptimizer):
    name = "search"

    def optimize(self, space: SearchSpace,
                 evaluate: Callable[[Candidate], Scored]) -> list[Scored]:
        pairs = itertools.product(space.system_prompts, space.fewshot_sets)
        scored = []
        for number, (system_prompt, fewshot) in enumerate(
                itertools.islice(pairs, space.max_candidates), start=1):
            shots = ",".join(str(d.get("id", "?")) for d in fewshot)
            label = f"system={system_prompt!r}, " + (f"shots {shots}" if fewshot else "0-shot")
            candidate = Candidate(number, {"system_prompt": system_prompt, "fewshot": fewshot},
                                  label)
            scored.append(evaluate(candidate))
        return scored
