"""How long does the symbolic-link check take on a large experiment? (run on demand, not in
tests)

    python benchmarks/containment_scale.py [--trials 1000] [--repeats 7]

Every cruijff command on an experiment first checks that nothing it writes into leads
outside the experiment (cruijff.containment.check_contained). Here: an experiment folder of
`--trials` trials shaped like a run one in a temporary folder (each with logs/eval,
logs/finetune and checkpoints/epoch_0), every trial but the first sharing the first one's
fine-tune (its `checkpoints` a link to trial-0's): that many links to resolve.
Goal: under 3 s for 1,000 trials (median; typically about 0.1 s). For reference it is timed
against reading the experiment's and every trial folder's entries alone (os.scandir, no link
resolved, nothing below), in the same run, the order alternated.
(tests/reliability/test_symlinks.py checks the result at this size, not its speed.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from timing import alternate, describe, verdict

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "reliability"))
GOAL_S = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from test_symlinks import make_experiment, replace_with_link

    from cruijff.containment import check_contained

    with tempfile.TemporaryDirectory() as tmp:
        exp, dirs = make_experiment(Path(tmp), args.trials)
        for trial in dirs:
            for folder in ("logs/eval", "logs/finetune", "checkpoints/epoch_0"):
                (trial / folder).mkdir(parents=True)
        for trial in dirs[1:]:
            replace_with_link(trial / "checkpoints", dirs[0] / "checkpoints")

        def reads_alone() -> None:
            for folder in (exp, *dirs):
                with os.scandir(folder) as entries:
                    for entry in entries:
                        entry.is_symlink()

        times = alternate({"check_contained": lambda: check_contained(exp, dirs),
                           "directory reads alone (reference)": reads_alone}, args.repeats)
    print(f"{args.trials} trials, {args.trials - 1} links inside the experiment")
    for name, seconds in times.items():
        print(f"  {name:34s} {describe(seconds)}")
    goal = GOAL_S * args.trials / 1000
    print(f"check_contained: {verdict(times['check_contained'], goal)}"
          + ("" if args.trials == 1000 else " (the 3 s goal, scaled to the trials)"))


if __name__ == "__main__":
    main()
