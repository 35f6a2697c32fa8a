"""Test-double stage `testing_compute`: uses a chosen amount of memory (in itself and in
child processes), CPU and time, and says what work it did, so the measurement of stage
attempts (cruijff.usage, sacct on Slurm, OUT_OF_MEMORY) can be tested with known figures
without training anything. Offered only where CRUIJFF_TEST_DOUBLES=1, like testing_touch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from cruijff.fileio import load_yaml_mapping
from cruijff.testing.touch_stage import TouchStage


def hold(megabytes: int, seconds: float, cpu_s: float) -> None:
    """Keep `megabytes` resident (pages written: b"\\1" * n is resident, bytearray(n) is not
    until touched) for `seconds`, busy on the CPU for the first `cpu_s` of them."""
    block = b"\1" * (megabytes * 2**20)
    start = time.process_time()
    while time.process_time() - start < cpu_s:
        pass
    time.sleep(max(seconds - cpu_s, 0))
    del block


class ComputeStage(TouchStage):
    name = "testing_compute"
    output = "compute/output.txt"
    settings: ClassVar[dict[str, Any]] = {"allocate_mb": 0, "children": 0, "child_mb": 0,
                                          "hold_s": 0.0, "cpu_s": 0.0, "tokens": 0}

    def execute(self, config_path: Path) -> int:
        config = load_yaml_mapping(config_path, "testing_compute config")
        code = f"from cruijff.testing.compute_stage import hold; hold({int(config['child_mb'])}, " \
               f"{float(config['hold_s'])}, 0)"
        children = [subprocess.Popen([sys.executable, "-c", code])
                    for _ in range(int(config["children"]))]
        hold(int(config["allocate_mb"]), float(config["hold_s"]), float(config["cpu_s"]))
        for child in children:
            child.wait()
        report = os.environ.get("CRUIJFF_WORK_REPORT")
        if report and config["tokens"]:
            Path(report).write_text(json.dumps({"training_tokens": config["tokens"],
                                                "train_s": config["hold_s"]}), encoding="utf-8")
        print(f"testing_compute: {os.getpid()} SLURM_STEP_ID={os.environ.get('SLURM_STEP_ID')}")
        return super().execute(config_path)
