"""A test-double stage, `testing_touch`: it only writes one small output file (once the file
named by `wait_for`, if any, exists), so load and fault tests can drive hundreds of trials, or
stages that are still running, through real Prefect, Dask and Slurm without training or
evaluating anything.

Registered through the `cruijff.stages` entry point; an experiment uses it with
`pipeline: [testing_touch]` in its config.yaml. Never part of the default pipeline.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from cruijff.design import TrialSpec
from cruijff.fileio import atomic_write_text, load_yaml_mapping
from cruijff.stages import Stage, StageConfig, StageFailed, TrialContext, Verified, set_existing

OUTPUT = "touch/output.txt"


class TouchStage(Stage):
    name = "testing_touch"
    namespace = "testing_touch"
    backend = "cruijff"

    def enabled(self, trial: TrialSpec) -> bool:
        return True

    def resolve(self, ctx: TrialContext) -> StageConfig:
        config: dict[str, Any] = {"trial": ctx.trial.id, "index": 0, "wait_for": "",
                                  "exit_code": 0, "output": str(ctx.trial_dir / OUTPUT)}
        for key, value in self.overrides(ctx.trial).items():
            set_existing(config, key, value, "testing_touch config", self.namespace)
        command = [sys.executable, "-m", "cruijff", "exec", self.name,
                   str(self.config_path(ctx.trial_dir))]
        return StageConfig(config, command)

    def execute(self, config_path: Path) -> int:
        config = load_yaml_mapping(config_path, "testing_touch config")
        while config["wait_for"] and not Path(config["wait_for"]).exists():
            time.sleep(0.2)
        if config["exit_code"]:
            print(f"testing_touch: failing on purpose with exit code {config['exit_code']}")
            return int(config["exit_code"])
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
        return Verified([OUTPUT], {"index": config["index"]})

    def artifacts(self, trial_dir: Path, config: dict[str, Any]) -> list[Path]:
        return [trial_dir / "touch"]
