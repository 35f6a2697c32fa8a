"""cruijff's own copy of each training step's figures, beside whatever metric logger the
fine-tune config chooses.

Why: cruijff verifies a fine-tune by the loss it logged and reads its speed and memory from
the same lines. Reading torchtune's DiskLogger file tied that to one logger; a researcher
who logs to W&B, TensorBoard, MLflow or stdout had every finished fine-tune counted as
failed. Here the recipe process wraps the logger the config builds (torchtune's recipes call
`torchtune.config.instantiate(cfg.metric_logger)`) in a proxy that also writes each step's
numbers to the file the config's `cruijff_metrics_file` names, in DiskLogger's line format
(`Step N | loss:... lr:...`), and hands every call on to the user's logger unchanged. Rank 0
only; one line per call, flushed, so a run that dies still leaves its steps.

Imported by the recipe processes only (cruijff/recipes); the core reads the file as text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

CAPTURE_KEY = "cruijff_metrics_file"
"""cruijff's own key in a fine-tune config (torchtune reads no such key): the file the
capture writes. A config without it (built before, or a hand-written one) is run without
capture, and cruijff reads torchtune's DiskLogger file as it always did."""
CAPTURE_FILE = "cruijff_metrics.txt"
LOGGER_KEY = "metric_logger"
"""The config section torchtune's recipes build their metric logger from."""


def _number(value: Any) -> float | None:
    """A logged value as a float (python numbers and 0-d tensors), None for anything else."""
    if isinstance(value, str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


class CapturingLogger:
    """The user's metric logger, with every logged number also written to cruijff's file."""

    def __init__(self, logger: Any, path: Path) -> None:
        self._logger = logger
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", encoding="utf-8")  # this attempt's steps only

    def _write(self, step: int, payload: Mapping[str, Any]) -> None:
        figures = [(name, _number(value)) for name, value in payload.items()]
        shown = " ".join(f"{name}:{value}" for name, value in figures if value is not None)
        if shown and not self._file.closed:
            self._file.write(f"Step {step} | {shown}\n")
            self._file.flush()

    def log(self, name: str, data: Any, step: int) -> None:
        self._write(step, {name: data})
        self._logger.log(name, data, step)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        self._write(step, payload)
        self._logger.log_dict(payload, step)

    def log_config(self, config: Any) -> None:
        self._logger.log_config(config)

    def close(self) -> None:
        try:
            self._logger.close()
        finally:
            self._file.close()

    def __getattr__(self, name: str) -> Any:
        """Anything else a recipe or the logger's user reaches for is the user's logger's."""
        return getattr(self._logger, name)


def _rank() -> int:
    from torchtune.utils import get_world_size_and_rank

    return get_world_size_and_rank()[1]


def capture_path(node: Any) -> Path | None:
    """Where to capture, when `node` is a config's metric_logger section whose config names
    a capture file, on rank 0; else None."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_dict(node) or node._key() != LOGGER_KEY:
        return None
    target = node._get_root().get(CAPTURE_KEY)
    if not isinstance(target, str) or not target or _rank() != 0:
        return None
    return Path(target)


def install() -> None:
    """Make `torchtune.config.instantiate` wrap the metric logger it builds (idempotent).
    Call before the recipe's setup; the recipe looks the function up at call time."""
    from torchtune import config

    if getattr(config.instantiate, "cruijff_capture", False):
        return
    original: Callable[..., Any] = config.instantiate

    @functools.wraps(original)
    def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
        built = original(node, *args, **kwargs)
        path = capture_path(node) if built is not None else None
        return CapturingLogger(built, path) if path is not None else built

    instantiate.cruijff_capture = True  # type: ignore[attr-defined]
    config.instantiate = instantiate
