"""Test-double stages: `testing_touch` only writes one small output file (once the file named
by `wait_for`, if any, exists), so load and fault tests can drive hundreds of trials, or
stages that are still running, through real Prefect, Dask and Slurm without training or
evaluating anything; `testing_shared` does the same as a stage that trials with equal keys
share (as fine-tunes are).

Registered in cruijff/registry.py as test doubles: offered only where CRUIJFF_TEST_DOUBLES=1
(the test suite sets it); an experiment uses them with `pipeline: [testing_touch]`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from cruijff.fileio import atomic_write_text, load_yaml_mapping
from cruijff.plan import TrialSpec
from cruijff.stages import Stage, StageConfig, StageFailed, TrialContext, Verified, set_existing


class TouchStage(Stage):
    name = "testing_touch"
    backend = "cruijff"
    output: ClassVar[str] = "touch/output.txt"
    settings: ClassVar[dict[str, Any]] = {}
    """A subclass's own config keys and defaults (a design sets them as `<name>.<key>`)."""

    def enabled(self, trial: TrialSpec) -> bool:
        return True

    def _owner(self, ctx: TrialContext) -> str:
        """What the output file says, and part of the stage key."""
        return ctx.trial.id

    def resolve(self, ctx: TrialContext) -> StageConfig:
        config: dict[str, Any] = {"trial": self._owner(ctx), "index": 0, "wait_for": "",
                                  "exit_code": 0, "fail_once": "",
                                  "output": str(ctx.trial_dir / self.output),
                                  **self.settings}
        for key, value in self.overrides(ctx.trial).items():
            set_existing(config, key, value, "testing_touch config", self.namespace)
        return StageConfig(config, self.command(ctx.trial_dir, config, ctx.trial.model))

    def execute(self, config_path: Path) -> int:
        config = load_yaml_mapping(config_path, "testing_touch config")
        while config["wait_for"] and not Path(config["wait_for"]).exists():
            time.sleep(0.2)
        if config["exit_code"]:
            print(f"testing_touch: failing on purpose with exit code {config['exit_code']}")
            return int(config["exit_code"])
        if config["fail_once"] and not Path(config["fail_once"]).exists():
            Path(config["fail_once"]).touch()
            print(f"testing_touch: failing once, until {config['fail_once']} exists")
            return 3
        atomic_write_text(Path(config["output"]), f"{config['trial']} {config['index']}\n")
        return 0

    def verify(self, trial_dir: Path, config: dict[str, Any]) -> Verified:
        path = Path(config["output"])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise StageFailed(f"testing_touch wrote no output: {exc}") from None
        if text.split() != [str(config["trial"]), str(config["index"])]:
            raise StageFailed(f"testing_touch output {path} is not what it writes: {text!r}")
        return Verified([self.output], {"index": config["index"]})

    def artifacts(self, trial_dir: Path, config: dict[str, Any]) -> list[Path]:
        return [trial_dir / Path(self.output).parent]

    def output_paths(self, trial_dir: Path, config: dict[str, Any]) -> dict[str, Path]:
        return {"output": Path(config["output"])}


class SharedTouchStage(TouchStage):
    """`testing_touch` as a shared stage: trials with equal settings have equal keys, so one
    runs it and the others link its `shared/` folder."""

    name = "testing_shared"
    shared = True
    output = "shared/output.txt"
    folders = ("shared",)

    def _owner(self, ctx: TrialContext) -> str:
        return "shared"
