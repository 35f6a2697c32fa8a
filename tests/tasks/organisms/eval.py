"""A task as written for `inspect eval`, not for cruijff: its own package, two scorers, a
split it picks itself, records without ids, and no system_prompt or fewshot arguments."""

import json

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.scorer import includes, match
from inspect_ai.solver import generate
from organisms.generate import WORDS


@task
def model_organism(data_path: str, split: str = "validation") -> Task:
    with open(data_path) as fh:
        rows = json.load(fh)[split]
    return Task(
        dataset=MemoryDataset([Sample(input=r["input"], target=r["output"]) for r in rows],
                              name=f"organisms-{len(WORDS)}"),
        solver=generate(),
        scorer=[match(location="exact"), includes()],
    )
