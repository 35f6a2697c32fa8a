"""cruijff.analysis against known values: hand computations, textbook examples, scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as stats

from cruijff.analysis import (
    Comparison,
    Estimate,
    compare,
    holm,
    is_binary,
    mcnemar_exact,
    mean_estimate,
    newcombe_paired_interval,
    paired_bootstrap,
    wilson_interval,
)

Z95 = 1.959963984540054


# ---------------------------------------------------------------- is_binary


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 1, 1, 0], True),
        ([1.0, 0.0], True),
        ([True, False], True),
        ([1, 1, 1], True),
        ([0, 1, 0.5], False),
        ([0, 1, 2], False),
        ([0, 1, float("nan")], False),
        ([-1, 0], False),
        ([], False),
    ],
)
def test_is_binary(values, expected):
    assert is_binary(values) is expected


# ---------------------------------------------------------------- Wilson


def test_wilson_textbook_8_of_10():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=5e-5)
    assert high == pytest.approx(0.9433, abs=5e-5)


def test_wilson_zero_and_all_successes_by_hand():
    # x = 0: the interval is [0, z^2 / (n + z^2)]; x = n mirrors it.
    upper = Z95**2 / (10 + Z95**2)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(upper, rel=1e-12))
    assert upper == pytest.approx(0.2775, abs=5e-5)
    assert wilson_interval(10, 10) == (pytest.approx(1 - upper, rel=1e-12), 1.0)


@pytest.mark.parametrize(
    "x, n, confidence",
    [(8, 10, 0.95), (1, 1, 0.95), (0, 1, 0.9), (37, 120, 0.99), (512, 1000, 0.8), (3, 7, 0.5)],
)
def test_wilson_matches_scipy_and_closed_form(x, n, confidence):
    low, high = wilson_interval(x, n, confidence)
    ci = stats.binomtest(x, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert (low, high) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    # The usual closed form: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n).
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = x / n
    center = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    assert low == pytest.approx(max(0.0, center - half), abs=1e-12)
    assert high == pytest.approx(min(1.0, center + half), abs=1e-12)


@pytest.mark.parametrize(
    "x, n, confidence", [(0, 0, 0.95), (1, 0, 0.95), (-1, 5, 0.95), (6, 5, 0.95), (1, 5, 1.0)]
)
def test_wilson_rejects_bad_input(x, n, confidence):
    with pytest.raises(ValueError):
        wilson_interval(x, n, confidence)


# ---------------------------------------------------------------- McNemar


def test_mcnemar_by_hand():
    # b=1, c=6: 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128
    assert mcnemar_exact(1, 6) == 0.125
    assert mcnemar_exact(6, 1) == 0.125
    # b=0, c=5: 2 * 1 / 32
    assert mcnemar_exact(0, 5) == 0.0625
    # b=2, c=8: 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024, rel=1e-15)


@pytest.mark.parametrize("b", [0, 1, 7, 500])
def test_mcnemar_equal_counts_is_one(b):
    assert mcnemar_exact(b, b) == 1.0


def test_mcnemar_one_discordant_pair_is_one():
    assert mcnemar_exact(0, 1) == 1.0  # 2 * 1/2, capped


@pytest.mark.parametrize(
    "b, c",
    [(6, 16), (13, 29), (300, 350), (4, 90), (9990, 10100), (10990, 11100), (200, 25000)],
)
def test_mcnemar_matches_scipy_binomtest(b, c):
    # Includes sizes on both sides of the switch from exact integers to log-space sums.
    expected = stats.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_published_example():
    # Cavo et al. 2012 via Fagerland, Lydersen & Laake (2017), ch. 8: 6 vs 16 discordant.
    assert mcnemar_exact(6, 16) == pytest.approx(0.0525, abs=5e-5)


def test_mcnemar_rejects_negative():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


# ---------------------------------------------------------------- Newcombe paired interval


def test_newcombe_published_example():
    # Cavo et al. (2012) table [[59, 6], [16, 80]]: Fagerland, Lydersen & Laake (2017) report
    # estimate -0.0621, 95% CI -0.1186 to -0.0046 for the Newcombe square-and-add interval.
    low, high = newcombe_paired_interval(59, 6, 16, 80)
    assert low == pytest.approx(-0.1186, abs=5e-5)
    assert high == pytest.approx(-0.0046, abs=5e-5)


def test_newcombe_is_antisymmetric_and_bounded():
    low, high = newcombe_paired_interval(59, 6, 16, 80)
    swapped = newcombe_paired_interval(59, 16, 6, 80)
    assert swapped == (pytest.approx(-high, abs=1e-12), pytest.approx(-low, abs=1e-12))
    for table in [(0, 10, 0, 0), (0, 0, 10, 0), (5, 0, 0, 0), (0, 0, 0, 5), (0, 1, 0, 0)]:
        lo, hi = newcombe_paired_interval(*table)
        d = (table[1] - table[2]) / sum(table)
        assert -1.0 <= lo <= d <= hi <= 1.0


def test_newcombe_rejects_empty_table():
    with pytest.raises(ValueError):
        newcombe_paired_interval(0, 0, 0, 0)


# ---------------------------------------------------------------- mean_estimate


def test_mean_estimate_binary_uses_wilson():
    est = mean_estimate([1] * 8 + [0] * 2)
    assert est == Estimate(0.8, *wilson_interval(8, 10), n=10, method="wilson")
    assert (est.low, est.high) == (pytest.approx(0.4902, abs=5e-5), pytest.approx(0.9433, abs=5e-5))


def test_mean_estimate_single_binary_sample():
    est = mean_estimate([1])
    assert est.method == "wilson" and est.value == 1.0 and est.high == 1.0
    assert est.low == pytest.approx(1 / (1 + Z95**2), rel=1e-12)


def test_bootstrap_is_reproducible_per_seed():
    x = np.random.default_rng(7).gamma(2.0, size=300)
    a = mean_estimate(x, seed=3)
    assert a == mean_estimate(x, seed=3)
    assert a != mean_estimate(x, seed=4)
    assert a.method == "bootstrap" and a.n == 300
    assert a.value == pytest.approx(x.mean(), rel=1e-15)
    assert a.low < a.value < a.high


def test_bootstrap_width_close_to_normal_theory():
    x = np.random.default_rng(11).normal(0.3, 2.0, size=2000)
    est = mean_estimate(x)
    lo, hi = stats.t.interval(0.95, df=x.size - 1, loc=x.mean(), scale=stats.sem(x))
    assert (est.high - est.low) == pytest.approx(hi - lo, rel=0.10)
    assert est.low == pytest.approx(lo, abs=0.1 * (hi - lo))
    assert est.high == pytest.approx(hi, abs=0.1 * (hi - lo))


def test_bootstrap_confidence_level_changes_width():
    x = np.random.default_rng(5).uniform(size=500)
    w90 = mean_estimate(x, 0.90)
    w99 = mean_estimate(x, 0.99)
    # Normal theory: width ratio z(0.995) / z(0.95) = 2.5758 / 1.6449.
    ratio = (w99.high - w99.low) / (w90.high - w90.low)
    assert ratio == pytest.approx(2.5758 / 1.6449, rel=0.1)


def test_mean_estimate_all_equal_and_single_values():
    est = mean_estimate([0.5] * 20)
    assert (est.value, est.low, est.high) == (0.5, 0.5, 0.5)
    one = mean_estimate([0.25])
    assert one.value == 0.25 and one.n == 1 and math.isnan(one.low) and math.isnan(one.high)


@pytest.mark.parametrize("values", [[], [0.5, float("nan")], [1.0, float("inf")], ["a"]])
def test_mean_estimate_rejects_bad_values(values):
    with pytest.raises(ValueError):
        mean_estimate(values)


def test_mean_estimate_rejects_bad_confidence():
    with pytest.raises(ValueError):
        mean_estimate([0.2, 0.4], confidence=95)


# ---------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_clear_effect():
    rng = np.random.default_rng(1)
    control = rng.normal(size=400)
    treatment = control + 0.5 + rng.normal(0, 0.5, size=400)
    diff, low, high, p = paired_bootstrap(treatment, control, resamples=2000)
    assert diff == pytest.approx(np.mean(treatment - control), rel=1e-12)
    assert 0 < low < diff < high
    assert p == 1 / 2001  # no resample of the null distribution is as extreme


def test_paired_bootstrap_no_effect():
    rng = np.random.default_rng(2)
    control = rng.normal(size=300)
    noise = rng.normal(0, 0.5, size=150)
    treatment = control + np.concatenate([noise, -noise])  # mean difference exactly ~0
    diff, low, high, p = paired_bootstrap(treatment, control)
    assert abs(diff) < 1e-12
    assert low < 0 < high
    assert p > 0.9


def test_paired_bootstrap_identical_scores():
    diff, low, high, p = paired_bootstrap([0.2, 0.7, 0.4], [0.2, 0.7, 0.4])
    assert (diff, low, high, p) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_matches_paired_t_for_large_sample():
    # For a large sample the bootstrap should agree with normal theory (paired t-test).
    rng = np.random.default_rng(3)
    control = rng.normal(size=1000)
    treatment = control + 0.05 + rng.normal(0, 1.0, size=1000)
    _, low, high, p = paired_bootstrap(treatment, control)
    t = stats.ttest_rel(treatment, control)
    ci = t.confidence_interval(0.95)
    assert 0.01 < t.pvalue < 0.2  # a moderate p, where the comparison is informative
    assert p == pytest.approx(t.pvalue, rel=0.2)
    assert (high - low) == pytest.approx(ci.high - ci.low, rel=0.1)


def test_paired_bootstrap_pairs_matter():
    # Strongly correlated pairs: the paired interval is much narrower than an unpaired one.
    rng = np.random.default_rng(4)
    base = rng.normal(size=500)
    control = base + rng.normal(0, 0.1, size=500)
    treatment = base + 0.05 + rng.normal(0, 0.1, size=500)
    _, low, high, p = paired_bootstrap(treatment, control)
    assert high - low < 0.05 and p < 0.001


def test_paired_bootstrap_reproducible_and_single_pair():
    t, c = [0.1, 0.5, 0.9, 0.3], [0.2, 0.4, 0.6, 0.3]
    assert paired_bootstrap(t, c, seed=9) == paired_bootstrap(t, c, seed=9)
    diff, low, high, p = paired_bootstrap([0.9], [0.1])
    assert diff == pytest.approx(0.8) and p == 1.0 and math.isnan(low) and math.isnan(high)


def test_paired_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        paired_bootstrap([0.1, 0.2], [0.1])
    with pytest.raises(ValueError):
        paired_bootstrap([], [])
    with pytest.raises(ValueError):
        paired_bootstrap([0.1, float("nan")], [0.1, 0.2])


def test_paired_bootstrap_of_a_thousand_uniform_pairs():
    """The size analyze meets per comparison (its speed: benchmarks/bootstrap_speed.py): the
    difference is the mean paired difference, the interval the normal-theory one, and the p
    a Monte Carlo p over exactly the resamples asked for."""
    rng = np.random.default_rng(5)
    t, c = rng.uniform(size=1000), rng.uniform(size=1000)
    diff, low, high, p = paired_bootstrap(t, c, resamples=10_000)
    d = t - c
    assert diff == pytest.approx(d.mean(), abs=1e-12)
    half = Z95 * d.std(ddof=1) / math.sqrt(d.size)
    assert low < diff < high
    assert (low, high) == pytest.approx((diff - half, diff + half), abs=0.1 * half)
    extreme = p * (1 + 10_000)  # p = (1 + #extreme) / (1 + resamples)
    assert extreme == pytest.approx(round(extreme), abs=1e-6) and 1 <= round(extreme) <= 10_001


# ---------------------------------------------------------------- compare


def test_compare_binary_pairs_by_id_and_uses_mcnemar():
    control = {f"s{i}": 0 for i in range(10)} | {"only_control": 1}
    treatment = {f"s{i}": 0 for i in range(10)} | {"only_treatment": 0}
    for i in range(6):  # treatment right, control wrong
        treatment[f"s{i}"] = 1
    control["s6"] = 1  # control right, treatment wrong
    treatment["s7"] = control["s7"] = 1  # both right
    result = compare(treatment, control)
    assert isinstance(result, Comparison)
    assert (result.n, result.wins, result.losses) == (10, 6, 1)
    assert result.method == "mcnemar-exact"
    assert result.p_value == 0.125  # b=1, c=6 by hand
    assert result.difference == pytest.approx(0.5)  # 7/10 - 2/10
    assert (result.low, result.high) == pytest.approx(newcombe_paired_interval(1, 6, 1, 2))
    assert result.low < result.difference < result.high


def test_compare_published_table():
    # Cavo et al. 2012: 59 both, 6 treatment-only, 16 control-only, 80 neither.
    cells = [(1, 1)] * 59 + [(1, 0)] * 6 + [(0, 1)] * 16 + [(0, 0)] * 80
    treatment = {f"id{i}": t for i, (t, _) in enumerate(cells)}
    control = {f"id{i}": c for i, (_, c) in enumerate(cells)}
    r = compare(treatment, control)
    assert r.difference == pytest.approx(-0.0621, abs=5e-5)
    assert (r.low, r.high) == (pytest.approx(-0.1186, abs=5e-5), pytest.approx(-0.0046, abs=5e-5))
    assert r.p_value == pytest.approx(stats.binomtest(6, 22).pvalue, rel=1e-12)


def test_compare_continuous_uses_paired_bootstrap():
    treatment = {"a": 0.9, "b": 0.8, "c": 0.5, "d": 0.7, "e": 0.2, "x": 0.0}
    control = {"a": 0.5, "b": 0.8, "c": 0.6, "d": 0.1, "e": 0.1, "y": 1.0}
    r = compare(treatment, control, seed=1)
    assert r.method == "paired-bootstrap"
    assert (r.n, r.wins, r.losses) == (5, 3, 1)
    assert r.difference == pytest.approx((0.4 + 0.0 - 0.1 + 0.6 + 0.1) / 5)
    t, c = [0.9, 0.8, 0.5, 0.7, 0.2], [0.5, 0.8, 0.6, 0.1, 0.1]
    diff, low, high, p = paired_bootstrap(t, c, seed=1)
    assert (r.difference, r.low, r.high, r.p_value) == (diff, low, high, p)


def test_compare_one_side_binary_is_not_mcnemar():
    r = compare({"a": 1, "b": 0, "c": 1}, {"a": 0.5, "b": 0.5, "c": 0.25})
    assert r.method == "paired-bootstrap"


def test_compare_ignores_dict_order():
    rng = np.random.default_rng(8)
    ids = [f"q{i}" for i in range(50)]
    t = dict(zip(ids, rng.uniform(size=50), strict=True))
    c = dict(zip(ids, rng.uniform(size=50), strict=True))
    reversed_t = dict(reversed(list(t.items())))
    assert compare(t, c) == compare(reversed_t, c)


def test_compare_no_common_ids():
    with pytest.raises(ValueError, match="no sample ids in common"):
        compare({"a": 1}, {"b": 1})
    with pytest.raises(ValueError):
        compare({}, {})


def test_compare_rejects_nan():
    with pytest.raises(ValueError):
        compare({"a": 0.5, "b": float("nan")}, {"a": 0.5, "b": 0.1})


def test_compare_identical_binary():
    r = compare({"a": 1, "b": 0}, {"a": 1, "b": 0})
    assert (r.difference, r.p_value, r.wins, r.losses) == (0.0, 1.0, 0, 0)
    assert r.low < 0 < r.high


# ---------------------------------------------------------------- Holm


def test_holm_textbook():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_by_hand_with_running_max():
    # Sorted 0.001, 0.019, 0.02, 0.04, 0.3 times 5..1: 0.005, 0.076, 0.06, 0.08, 0.3;
    # the running max lifts 0.06 to 0.076.
    assert holm([0.3, 0.02, 0.001, 0.04, 0.019]) == pytest.approx([0.3, 0.076, 0.005, 0.08, 0.076])


def test_holm_caps_at_one_and_keeps_order():
    p = [0.5, 0.9, 0.2, 0.001, 0.6]
    adj = holm(p)
    assert max(adj) == 1.0
    assert all(a >= raw for a, raw in zip(adj, p, strict=True))
    ranked = sorted(range(len(p)), key=p.__getitem__)
    assert [adj[i] for i in ranked] == sorted(adj)  # monotone in the raw p-values


def test_holm_equal_p_values():
    assert holm([0.02, 0.02, 0.02]) == pytest.approx([0.06, 0.06, 0.06])
    assert holm([0.01, 0.01, 0.5]) == pytest.approx([0.03, 0.03, 0.5])


def test_holm_edge_cases():
    assert holm([]) == []
    assert holm([0.04]) == [0.04]
    assert holm([0.0, 1.0]) == [0.0, 1.0]


@pytest.mark.parametrize("p", [[0.1, float("nan")], [-0.1], [1.5]])
def test_holm_rejects_bad_p(p):
    with pytest.raises(ValueError):
        holm(p)


def test_holm_matches_random_brute_force():
    # Definition: adj_(i) = min(1, max_{j<=i} (m - j + 1) p_(j)), straight from Holm (1979).
    rng = np.random.default_rng(12)
    for _ in range(20):
        p = list(rng.uniform(0, 0.2, size=rng.integers(1, 9)))
        order = sorted(range(len(p)), key=p.__getitem__)
        m = len(p)
        expected = [0.0] * m
        for i, k in enumerate(order):
            expected[k] = min(1.0, max((m - j) * p[order[j]] for j in range(i + 1)))
        assert holm(p) == pytest.approx(expected, rel=1e-12)
