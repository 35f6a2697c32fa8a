"""Statistics for `cruijff analyze`: per-trial estimates, paired comparisons, multiplicity.

Pure functions, no I/O, numpy only (scipy is used by the tests to cross-check, never here).

- A trial's metric is the mean of its per-sample scores. Binary scores (all 0/1, i.e. accuracy)
  get a Wilson score interval, which keeps its coverage near 0 and 1 where the textbook Wald
  interval collapses; other scores get a seeded percentile bootstrap of the mean.
- A treatment is compared with its control on the samples both were scored on, as pairs: pairing
  removes the between-sample variance that dominates LLM evals. Binary pairs get McNemar's exact
  test and Newcombe's interval for a paired difference of proportions; other pairs get a paired
  bootstrap.
- p-values across treatments are adjusted with Holm's step-down method (controls the
  family-wise error rate under any dependence, and is never less powerful than Bonferroni).

Every bootstrap takes a seed, so a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "Comparison",
    "Estimate",
    "compare",
    "holm",
    "is_binary",
    "mcnemar_exact",
    "mean_estimate",
    "newcombe_paired_interval",
    "paired_bootstrap",
    "wilson_interval",
]

RESAMPLES = 10_000
# Resampled indices are drawn in blocks of about this many, so memory stays near 8 MB whatever
# the sample size; the block size depends only on n, so a seed always gives the same draws.
_BLOCK = 1 << 20
# Above this many discordant pairs the exact integer tail sum gets slow; sum in log space instead.
_EXACT_LIMIT = 20_000


@dataclass(frozen=True)
class Estimate:
    """A metric (mean score) with its confidence interval."""

    value: float
    low: float
    high: float
    n: int
    method: str  # "wilson" or "bootstrap"


@dataclass(frozen=True)
class Comparison:
    """A treatment against its control on the samples both were scored on."""

    n: int  # paired samples (ids present in both)
    difference: float  # mean(treatment) - mean(control)
    low: float  # confidence interval of the difference
    high: float
    p_value: float  # raw, two-sided; adjust across treatments with holm()
    method: str  # "mcnemar-exact" or "paired-bootstrap"
    wins: int  # samples where treatment scores higher than control
    losses: int  # samples where treatment scores lower than control


def _z(confidence: float) -> float:
    """Two-sided standard-normal critical value (1.959964 for 95%)."""
    _check_confidence(confidence)
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence!r}")


def _as_scores(values: Sequence[float], what: str = "values") -> np.ndarray:
    """Scores as a float array; empty or non-finite input is an error, not a silent NaN."""
    try:
        x = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be numbers: {e}") from None
    if x.ndim != 1:
        raise ValueError(f"{what} must be a flat sequence of numbers, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{what} is empty: need at least one score")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite scores")
    return x


def is_binary(values: Sequence[float]) -> bool:
    """Whether every value is 0 or 1 (and there is at least one): such scores are proportions.

    Never raises: NaN or non-numeric values are simply not binary.
    """
    try:
        x = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return False
    return x.ndim == 1 and x.size > 0 and bool(np.isin(x, (0.0, 1.0)).all())


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Chosen over the Wald interval because it stays inside [0, 1] and keeps close to nominal
    coverage for small n and for proportions near 0 or 1 (Brown, Cai & DasGupta 2001).
    """
    if n <= 0:
        raise ValueError(f"need at least one trial for a proportion, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    z = _z(confidence)
    z2 = z * z
    p = successes / n
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def _bootstrap_means(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of `resamples` with-replacement resamples of x, vectorized in fixed-size blocks."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    n = x.size
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK // n)
    means = np.empty(resamples)
    for start in range(0, resamples, rows):
        k = min(rows, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        means[start : start + k] = x[idx].mean(axis=1)
    return means


def _percentile_interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def mean_estimate(
    values: Sequence[float],
    confidence: float = 0.95,
    *,
    seed: int = 0,
    resamples: int = RESAMPLES,
    binary: bool | None = None,
) -> Estimate:
    """Mean score with a confidence interval: Wilson for 0/1 scores, else percentile bootstrap.

    `binary`: whether the scale is 0/1 (None: whether these values are). An error count or a
    partial-credit scorer can give one trial only 0s and 1s; binary=False keeps it on the
    bootstrap, as its other trials are. A single non-binary score says nothing about spread,
    so its interval is (nan, nan) rather than the degenerate (x, x) a bootstrap would give.
    """
    x = _as_scores(values)
    _check_confidence(confidence)
    value = float(x.mean())
    if is_binary(x) if binary is None else binary and is_binary(x):
        low, high = wilson_interval(int(x.sum()), x.size, confidence)
        return Estimate(value, low, high, x.size, "wilson")
    if x.size == 1:
        return Estimate(value, math.nan, math.nan, 1, "bootstrap")
    low, high = _percentile_interval(_bootstrap_means(x, resamples, seed), confidence)
    return Estimate(value, low, high, x.size, "bootstrap")


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pair counts b and c.

    Under no difference each discordant pair is a fair coin, so b ~ Binomial(b + c, 1/2) and
    p = min(1, 2 * P(X <= min(b, c))); equal to scipy's binomtest(b, b + c).pvalue. Exact rather
    than the chi-square version, which is poor for the few discordant pairs small evals have.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if 2 * k >= n:  # b == c (including 0 == 0): the observed split is the most likely one
        return 1.0
    if n <= _EXACT_LIMIT:
        term = total = 1  # C(n, 0); integers, so the tail is exact until the final division
        for i in range(k):
            term = term * (n - i) // (i + 1)
            total += term
        return min(1.0, 2 * total / 2**n)
    i = np.arange(1, k + 1, dtype=float)
    log_terms = np.concatenate(([0.0], np.cumsum(np.log(n - i + 1) - np.log(i))))
    top = log_terms.max()
    log_tail = top + math.log(np.exp(log_terms - top).sum())
    return min(1.0, 2 * math.exp(log_tail - n * math.log(2)))


def newcombe_paired_interval(
    both: int, wins: int, losses: int, neither: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Interval for p(treatment) - p(control) from a paired 2x2 table (Newcombe 1998, method 10).

    `both`/`neither`: pairs where both / neither succeed; `wins`: treatment only; `losses`:
    control only. Combines the two marginal Wilson intervals, corrected for the correlation of
    the pairs ("square and add"). Chosen because it is closed-form, stays in [-1, 1], and keeps
    near-nominal coverage at small n and extreme proportions where the Wald interval fails
    (Newcombe 1998; recommended by Fagerland, Lydersen & Laake 2014). Its phi uses Newcombe's
    continuity correction, as in Altman et al. (2000) and Fagerland et al. (2017).
    """
    counts = (both, wins, losses, neither)
    if min(counts) < 0:
        raise ValueError(f"table counts must be non-negative, got {counts}")
    n = sum(counts)
    if n == 0:
        raise ValueError("need at least one pair for a paired interval")
    t_succ, c_succ = both + wins, both + losses
    p1, p2 = t_succ / n, c_succ / n
    l1, u1 = wilson_interval(t_succ, n, confidence)
    l2, u2 = wilson_interval(c_succ, n, confidence)
    margins = t_succ * (n - t_succ) * c_succ * (n - c_succ)
    phi = 0.0
    if margins > 0:
        a = both * neither - wins * losses
        if a > n / 2:
            phi = (a - n / 2) / math.sqrt(margins)
        elif a < 0:
            phi = a / math.sqrt(margins)
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)))
    high = d + math.sqrt(
        max(0.0, (p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1))
    )
    return max(-1.0, low), min(1.0, high)


def paired_bootstrap(
    treatment: Sequence[float],
    control: Sequence[float],
    confidence: float = 0.95,
    *,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> tuple[float, float, float, float]:
    """(difference, low, high, p) for mean(treatment - control) over aligned pairs.

    Pairs are resampled whole, so the interval reflects the per-sample correlation.
    Interval: percentile bootstrap. p-value: shifted-null bootstrap test (Efron & Tibshirani
    1993, sec. 16.4; Hall & Wilson 1991): the bootstrap means are centred on zero to
    imitate the null of no mean difference, and
    p = (1 + #{|mean* - d| >= |d|}) / (1 + resamples), where d is the observed mean difference.
    The +1s make p a valid (never zero) Monte Carlo p-value. Like any bootstrap this
    understates spread for very few pairs; a single pair gives no evidence (p = 1, interval nan).
    """
    t = _as_scores(treatment, "treatment")
    c = _as_scores(control, "control")
    if t.size != c.size:
        raise ValueError(f"need aligned pairs, got {t.size} treatment and {c.size} control scores")
    _check_confidence(confidence)
    d = t - c
    diff = float(d.mean())
    if d.size == 1:
        return diff, math.nan, math.nan, 1.0
    means = _bootstrap_means(d, resamples, seed)
    low, high = _percentile_interval(means, confidence)
    # A tolerance a little above rounding error, so exact ties (e.g. all differences zero)
    # count as "at least as extreme".
    tol = 1e-12 * float(np.abs(d).max())
    extreme = int(np.count_nonzero(np.abs(means - diff) >= abs(diff) - tol))
    return diff, low, high, min(1.0, (1 + extreme) / (1 + resamples))


def compare(
    treatment: Mapping[str, float],
    control: Mapping[str, float],
    confidence: float = 0.95,
    *,
    seed: int = 0,
    resamples: int = RESAMPLES,
    binary: bool | None = None,
) -> Comparison:
    """Compare a treatment with its control on the sample ids scored in both.

    Ids in only one of them are ignored (e.g. a sample that failed in one trial). Pairs are
    taken in sorted id order, so the result does not depend on dict order. Binary scores get
    McNemar's exact p and Newcombe's paired interval; other scores a paired bootstrap
    (`binary=False`: a paired bootstrap whatever these values are; see mean_estimate).
    """
    common = sorted(set(treatment) & set(control))
    if not common:
        raise ValueError("treatment and control have no sample ids in common: nothing to pair")
    t = _as_scores([treatment[k] for k in common], "treatment")
    c = _as_scores([control[k] for k in common], "control")
    wins = int(np.count_nonzero(t > c))
    losses = int(np.count_nonzero(t < c))
    n = len(common)
    if binary is not False and is_binary(t) and is_binary(c):
        both = int(np.count_nonzero((t == 1) & (c == 1)))
        low, high = newcombe_paired_interval(
            both, wins, losses, n - both - wins - losses, confidence
        )
        return Comparison(
            n=n,
            difference=(wins - losses) / n,
            low=low,
            high=high,
            p_value=mcnemar_exact(wins, losses),
            method="mcnemar-exact",
            wins=wins,
            losses=losses,
        )
    diff, low, high, p = paired_bootstrap(t, c, confidence, seed=seed, resamples=resamples)
    return Comparison(n, diff, low, high, p, "paired-bootstrap", wins, losses)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in input order.

    The i-th smallest p is multiplied by (m - i + 1), then a running maximum keeps the adjusted
    values in the same order as the raw ones, and they are capped at 1. Reject where the
    adjusted p <= alpha.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p-values must be a flat sequence, got shape {p.shape}")
    if p.size == 0:
        return []
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("p-values must lie in [0, 1] (no NaN)")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (m - np.arange(m))
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate(scaled))
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return [float(v) for v in adjusted]
