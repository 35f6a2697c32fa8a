"""How long does `cruijff analyze` take for a large experiment? (run on demand, not in tests)

    python benchmarks/analyze_scale.py [--trials 1000] [--samples 50] [--steps 100]

Writes a synthetic finished experiment into a temporary folder (stage records, a real Inspect
log per trial with `--samples` CORRECT/INCORRECT scores, a loss log of `--steps` steps for
every other trial; groups of 100 trials share one control), then times `analyze` (load into the
SQLite store + compute + write csv, md and html) on a fresh store and again on a filled one.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()

    from results_support import SyntheticTrial, make_experiment

    from cruijff.design import trial_ids
    from cruijff.report import analyze

    rng = random.Random(0)
    trials = []
    control = None
    for i, trial_id in enumerate(itertools.islice(trial_ids(), args.trials)):
        p = rng.uniform(0.2, 0.9)
        scores = [int(rng.random() < p) for _ in range(args.samples)]
        losses = ([round(3.0 * 0.97 ** s + rng.uniform(0, 0.1), 4) for s in range(args.steps)]
                  if i % 2 == 0 else [])
        if i % 100 == 0:
            control = trial_id
            trials.append(SyntheticTrial(trial_id, scores=scores, losses=losses))
        else:
            trials.append(SyntheticTrial(trial_id, scores=scores, losses=losses, control=control,
                                         treatment={"finetune.lr": round(1e-4 * i, 6)}))

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        experiment = make_experiment(Path(tmp) / "scale", trials)
        print(f"wrote {args.trials} trials x {args.samples} samples in "
              f"{time.perf_counter() - started:.1f} s (not timed below)")
        for run in ("fresh store", "filled store"):
            started = time.perf_counter()
            analysis = analyze(experiment)
            total = time.perf_counter() - started
            load = analysis.load
            assert load is not None
            print(f"analyze ({run}): {total:.2f} s total = load {load.duration_s:.2f} s "
                  f"({load.samples} samples, {load.losses} losses) + compute and report "
                  f"{total - load.duration_s:.2f} s; {len(analysis.compared)} comparisons; "
                  f"report.html {(analysis.report_dir / 'report.html').stat().st_size / 1e6:.1f}"
                  " MB")


if __name__ == "__main__":
    main()
