"""What a build plans: trials (one combination of model, dataset and settings each).

A leaf module, so that stages, the runner and the design can all name a trial without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrialSpec:
    """One combination of model, dataset and settings."""

    id: str
    model: str
    dataset: str
    use_fine_tune: bool
    use_prompt_opt: bool
    settings: dict[str, Any]
    """Stage keys ('finetune.model.lora_rank', ...) from controls and the treatment."""
    treatment: dict[str, Any]
    """What this trial changes relative to its control ({} for a control trial)."""
    control: str | None
    """Id of this trial's control trial, if one was built."""

    @property
    def is_control(self) -> bool:
        return not self.treatment

    @property
    def label(self) -> str:
        if self.is_control:
            return "control"
        return ", ".join(f"{k}={short_value(v)}" for k, v in self.treatment.items())

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "dataset": self.dataset,
                "use_fine_tune": self.use_fine_tune, "use_prompt_opt": self.use_prompt_opt,
                "settings": self.settings, "treatment": self.treatment, "control": self.control}


def short_value(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


@dataclass
class Plan:
    trials: list[TrialSpec]
    notices: list[str]
