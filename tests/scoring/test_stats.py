"""Intervals and paired tests of scoring/stats.py against values computed by hand (the computation is in
the comments), and against brute force where a closed form is the claim."""

from __future__ import annotations

import math

import pytest

from lightkv_cli.scoring.stats import (
    binomial_upper_tail,
    bootstrap_ci,
    clopper_pearson_lower,
    mcnemar_exact,
    mean_interval,
    paired_bootstrap_ci,
    paired_difference_test,
    tango_score_z,
    wilson_inputs_needed,
    wilson_interval,
)

Z = 1.959963984540054  # the 0.975 standard-normal quantile; Z² = 3.841459


def test_wilson_all_agree_is_not_zero_width():
    # k = n: centre − half = n/(n + z²). n = 8: 8/(8 + 3.841459) = 8/11.841459 = 0.67559; upper 1.
    low, high = wilson_interval(8, 8)
    assert low == pytest.approx(0.67559, abs=1e-5) and high == 1.0
    # k = 0 mirrors it: [0, 1 − 0.67559] = [0, 0.32441].
    low, high = wilson_interval(0, 8)
    assert low == 0.0 and high == pytest.approx(0.32441, abs=1e-5)


def test_wilson_against_the_formula_by_hand():
    # k = 4, n = 8: p̂ = 0.5, z²/n = 0.480182, denominator 1.480182.
    # centre = (0.5 + 0.240091)/1.480182 = 0.5; half = 1.959964/1.480182 · sqrt(0.25/8 + 3.841459/256)
    #        = 1.324138 · sqrt(0.03125 + 0.015006) = 1.324138 · 0.215072 = 0.284784 → [0.21522, 0.78478].
    low, high = wilson_interval(4, 8)
    assert low == pytest.approx(0.21522, abs=1e-5) and high == pytest.approx(0.78478, abs=1e-5)
    # k = 19, n = 20: p̂ = 0.95, z²/n = 0.192073, denominator 1.192073;
    # centre = (0.95 + 0.096036)/1.192073 = 0.877494; half = 1.644166 · sqrt(0.002375 + 0.002401)
    #        = 1.644166 · 0.069109 = 0.113627 → [0.76387, 0.99112].
    low, high = wilson_interval(19, 20)
    assert low == pytest.approx(0.76387, abs=1e-4) and high == pytest.approx(0.99112, abs=1e-4)
    # A narrower level gives a narrower interval around the same centre.
    low90, high90 = wilson_interval(19, 20, level=0.9)
    assert low < low90 < 0.95 < high90 < high


@pytest.mark.parametrize("k, n", [(-1, 5), (6, 5), (1, 0), (1.5, 4), (True, 4)])
def test_wilson_bad_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_mean_interval_is_wilson_for_0_1_values_and_bootstrap_otherwise():
    assert mean_interval([1.0] * 8) == wilson_interval(8, 8)
    assert mean_interval([1, 0, 1, 1]) == wilson_interval(3, 4)
    assert mean_interval([0.5, 1.0, 0.25]) == bootstrap_ci([0.5, 1.0, 0.25])
    with pytest.raises(ValueError):
        mean_interval([])


def test_inputs_needed_to_pass_a_floor_when_every_input_agrees():
    # n ≥ z²·t/(1 − t): t = 0.95 → 3.841459 · 19 = 72.99 → 73; t = 0.9 → 3.841459 · 9 = 34.57 → 35.
    assert wilson_inputs_needed(0.95) == 73 and wilson_inputs_needed(0.9) == 35
    assert wilson_interval(73, 73)[0] >= 0.95 > wilson_interval(72, 72)[0]
    assert math.isinf(wilson_inputs_needed(1.0))


def test_mcnemar_exact_by_hand():
    # b = 6, c = 1: m = 7, p = 2 · (C(7,0) + C(7,1))/2^7 = 2 · 8/128 = 0.125.
    assert mcnemar_exact(6, 1) == pytest.approx(0.125)
    assert mcnemar_exact(1, 6) == pytest.approx(0.125)  # two-sided: symmetric
    # b = 5, c = 0: 2 · 1/32 = 0.0625; b = 10, c = 0: 2/1024 = 0.001953.
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625)
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    # b = c: the sum passes the middle, p is capped at 1; no discordant pair: 1.
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    # Large counts stay exact (integer arithmetic): b = 600, c = 400 is far from chance.
    assert 0 < mcnemar_exact(600, 400) < 1e-9
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_binomial_tail_and_clopper_pearson_by_hand():
    # P(X ≥ 1 | n = 10, p = 0.02) = 1 − 0.98^10 = 1 − 0.817073 = 0.182927.
    assert binomial_upper_tail(1, 10, 0.02) == pytest.approx(0.182927, abs=1e-6)
    # P(X ≥ 10 | 10, 0.5) = 1/1024; k = 0 is certain.
    assert binomial_upper_tail(10, 10, 0.5) == pytest.approx(1 / 1024)
    assert binomial_upper_tail(0, 10, 0.3) == 1.0
    # One success in 10: P(X ≥ 1 | p) = 1 − (1 − p)^10 = 0.05 → p = 1 − 0.95^(1/10) = 0.0051162.
    assert clopper_pearson_lower(1, 10) == pytest.approx(1 - 0.95**0.1, abs=1e-9)
    # All 5 succeed: p^5 = 0.05 → p = 0.05^(1/5) = 0.549280.
    assert clopper_pearson_lower(5, 5) == pytest.approx(0.05**0.2, abs=1e-9)
    assert clopper_pearson_lower(0, 5) == 0.0
    # Large n does not overflow.
    assert 0.0 < binomial_upper_tail(60, 2000, 0.02) < 1.0


def _restricted_mle_by_grid(b, c, n, delta, steps=200_000):
    """argmax over q of b·log(q + δ) + c·log(q) + (n − b − c)·log(1 − 2q − δ), by brute force."""
    hi = (1 - delta) / 2
    lo = max(0.0, -delta)
    best, arg = -math.inf, None
    for i in range(1, steps):
        q = lo + (hi - lo) * i / steps
        ll = (b * math.log(q + delta) if b else 0) + (c * math.log(q) if c else 0)
        ll += (n - b - c) * math.log(1 - 2 * q - delta) if n - b - c else 0
        if ll > best:
            best, arg = ll, q
    return arg


def test_tango_score_by_hand_and_by_brute_force():
    # b = 6, c = 1, n = 20, δ0 = 0.02: 2n·q² + B·q + C = 0 with 2n = 40,
    # B = −7 + (40 − 6 + 1)·0.02 = −6.3, C = −1 · 0.02 · 0.98 = −0.0196;
    # q̃ = (6.3 + sqrt(39.69 + 3.136))/80 = (6.3 + 6.544158)/80 = 0.160552;
    # Z = (6 − 1 − 0.4)/sqrt(20 · (0.321104 + 0.0196)) = 4.6/2.610379 = 1.76220; p = 1 − Φ(1.7622) = 0.0390.
    assert tango_score_z(6, 1, 20, 0.02) == pytest.approx(1.76220, abs=1e-4)
    p, _ = paired_difference_test(6, 1, 20, 0.02)
    assert p == pytest.approx(0.0390, abs=2e-4)
    # The restricted MLE in the formula is the maximum of the likelihood (checked on a grid).
    from lightkv_cli.scoring.stats import _tango_restricted_q21

    for b, c, n, d in ((6, 1, 20, 0.02), (3, 4, 30, 0.1), (0, 2, 10, -0.1)):
        assert _tango_restricted_q21(b, c, n, d) == pytest.approx(_restricted_mle_by_grid(b, c, n, d), abs=1e-4)
    # At δ0 = 0 it is McNemar's z = (b − c)/sqrt(b + c) = 5/sqrt(7) = 1.889822.
    assert tango_score_z(6, 1, 20, 0.0) == pytest.approx(5 / math.sqrt(7))


def test_paired_difference_bound_and_p_value_agree():
    # The one-sided 95% lower bound is where Z = 1.644854; p < 0.05 exactly when the bound exceeds the margin.
    for b, c, n in ((6, 1, 20), (10, 2, 40), (1, 1, 50), (0, 0, 8), (12, 0, 12)):
        _, lower = paired_difference_test(b, c, n, 0.0)
        if lower > -1.0:
            assert tango_score_z(b, c, n, lower) == pytest.approx(1.644854, abs=1e-3)
        for margin in (0.0, 0.02, 0.1, 0.3):
            p, bound = paired_difference_test(b, c, n, margin)
            assert bound == pytest.approx(lower, abs=1e-9)
            assert (p < 0.05) == (bound > margin), (b, c, n, margin, p, bound)
    # 6 − 1 of 20: the drop 0.25 has lower bound 0.0379 > 0.02, so a 0.02 margin fails and 0.05 passes.
    p, lower = paired_difference_test(6, 1, 20, 0.05)
    assert lower == pytest.approx(0.0379, abs=1e-3) and p > 0.05


def test_paired_bootstrap_is_of_the_differences_and_deterministic():
    ref, cmp = [0.0, 0.0, 0.0, 0.0], [0.1, 0.3, 0.0, 0.2]
    assert paired_bootstrap_ci(ref, cmp) == bootstrap_ci([0.1, 0.3, 0.0, 0.2])
    assert paired_bootstrap_ci([1.0, 2.0], [1.0, 2.0]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0], [1.0, 2.0])
