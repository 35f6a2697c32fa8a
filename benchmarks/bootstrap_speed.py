"""How long does one paired bootstrap take at the size analyze meets? (run on demand, not in
tests)

    python benchmarks/bootstrap_speed.py [--pairs 1000] [--resamples 10000] [--repeats 7]

`cruijff analyze` compares every treatment with its control by a paired bootstrap
(cruijff.analysis.paired_bootstrap) when scores are not binary: for 1,000 trials that is up
to 1,000 of them, so one must stay well under a second. Goal: 1,000 pairs x 10,000
resamples in under 3 s (median; typically about 0.1 s). For reference it is timed against
scipy.stats.bootstrap doing the same paired percentile bootstrap, in the same run, the order
alternated. (tests/test_analysis.py checks the result at this size, not its speed.)
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import alternate, describe, verdict

GOAL_S = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from scipy import stats

    from cruijff.analysis import paired_bootstrap

    rng = np.random.default_rng(5)
    treatment, control = rng.uniform(size=args.pairs), rng.uniform(size=args.pairs)

    def scipy_paired() -> None:
        stats.bootstrap((treatment, control), lambda t, c, axis: (t - c).mean(axis=axis),
                        paired=True, vectorized=True, n_resamples=args.resamples,
                        method="percentile", random_state=0)

    times = alternate({
        "cruijff paired_bootstrap": lambda: paired_bootstrap(treatment, control,
                                                             resamples=args.resamples),
        "scipy.stats.bootstrap (reference)": scipy_paired,
    }, args.repeats)
    print(f"{args.pairs} pairs x {args.resamples} resamples")
    for name, seconds in times.items():
        print(f"  {name:34s} {describe(seconds)}")
    if (args.pairs, args.resamples) == (1000, 10_000):
        print(f"cruijff: {verdict(times['cruijff paired_bootstrap'], GOAL_S)}")
    else:
        print("(the goal is stated for 1000 pairs x 10000 resamples)")


if __name__ == "__main__":
    main()
