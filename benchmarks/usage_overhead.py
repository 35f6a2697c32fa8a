"""What does measuring a stage attempt cost? (run on demand, not in tests)

    python benchmarks/usage_overhead.py [--seconds 20] [--children 2] [--repeats 5]

A CPU-bound stand-in for a stage (a process busy for `--seconds` of CPU, with `--children`
child processes holding memory beside it) is run bare and under `python -m cruijff.usage`
(what every stage attempt runs under unless CRUIJFF_USAGE=off), `--repeats` times each, in one
run, the order alternated. Prints both sides' wall time, the difference, and what the
launcher's own CPU was as a share of the stage's wall time (goal: < 1 %).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import alternate, describe

GOAL = 0.01


def stage(seconds: float, children: int) -> list[str]:
    code = ("import subprocess, sys\n"
            "from cruijff.testing.compute_stage import hold\n"
            f"kids = [subprocess.Popen([sys.executable, '-c', 'from cruijff.testing.compute_stage"
            f" import hold; hold(50, {seconds}, 0)']) for _ in range({children})]\n"
            f"hold(100, {seconds}, {seconds})\n"
            "[k.wait() for k in kids]\n")
    return [sys.executable, "-c", code]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--children", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    command = stage(args.seconds, args.children)
    shares: list[float] = []
    walls: list[float] = []
    startups: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "usage.json"

        def measured() -> None:
            subprocess.run([sys.executable, "-m", "cruijff.usage", "--out", str(out), "--",
                            *command], check=True)
            figures = json.loads(out.read_text())
            shares.append(figures["sampler_cpu_s"] / figures["wall_s"])
            walls.append(figures["wall_s"])

        for _ in range(args.repeats):
            subprocess.run([sys.executable, "-m", "cruijff.usage", "--out", str(out), "--",
                            "true"], check=True)
            startups.append(json.loads(out.read_text())["sampler_cpu_s"])

        times = alternate({"bare": lambda: subprocess.run(command, check=True),
                           "measured": measured}, args.repeats)
    print(f"stage: {args.seconds:g} s of CPU, {args.children} child processes holding memory")
    for name, seconds in times.items():
        print(f"  {name:9} {describe(seconds)}")
    difference = statistics.median(times["measured"]) - statistics.median(times["bare"])
    print(f"  wall difference of the medians: {difference:+.3f} s "
          f"({difference / statistics.median(times['bare']):+.2%})")
    share = statistics.median(shares)
    print(f"  launcher CPU / stage wall: median {share:.3%} (range {min(shares):.3%}-"
          f"{max(shares):.3%}); goal < {GOAL:.0%}: {'met' if share < GOAL else 'MISSED'}")
    startup = statistics.median(startups)
    sampling = [s - startup / w for s, w in zip(shares, walls, strict=True)]
    print(f"  of which start-up (a stage that does nothing): {startup:.3f} s CPU, once; "
          f"sampling alone: median {statistics.median(sampling):.3%} of the wall")


if __name__ == "__main__":
    main()
