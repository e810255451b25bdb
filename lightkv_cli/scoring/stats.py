"""Statistics over inputs and repeats: percentiles, spreads of repeated timings, confidence intervals
of means over inputs (Wilson score intervals for 0/1 metrics, percentile bootstrap for continuous ones),
and the paired tests of ``lightkv check --max-drop`` (exact McNemar, exact one-sample binomial, Tango's
score test for a paired difference of proportions with a margin). Pure Python; no torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of sorted values (numpy's default, ``method="linear"``), ``q`` in
    [0, 1]; inf-safe (two equal infinite neighbours give inf, not nan).

    Raises:
        IndexError: ``ordered`` is empty.
    """
    position = q * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    fraction = position - lower
    low, high = ordered[lower], ordered[upper]
    if fraction == 0.0 or low == high:  # also avoids inf - inf = nan
        return low
    return low + (high - low) * fraction


@dataclass
class Spread:
    """Distribution of repeated measurements (e.g. latencies in ms; the unit is the input's).

    Attributes:
        median: 50th percentile.
        p25: 25th percentile.
        p75: 75th percentile.
        min: smallest value.
        max: largest value.
        n: number of values.
    """

    median: float
    p25: float
    p75: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """Summarize ``values`` with linear-interpolated percentiles (as ``numpy.percentile``).

        Args:
            values: one or more numbers, any order.

        Returns:
            A ``Spread`` in the same unit as ``values``.

        Raises:
            ValueError: if ``values`` is empty.
        """
        ordered = sorted(float(v) for v in values)
        if not ordered:
            raise ValueError("Spread.of needs at least one value")
        return cls(
            median=percentile(ordered, 0.5),
            p25=percentile(ordered, 0.25),
            p75=percentile(ordered, 0.75),
            min=ordered[0],
            max=ordered[-1],
            n=len(ordered),
        )

    def to_dict(self) -> dict[str, float | int]:
        """Plain-number dict for JSON output."""
        return asdict(self)


def bootstrap_ci(
    values: Sequence[float],
    level: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``.

    Draws ``resamples`` samples of ``len(values)`` values with replacement
    (``random.Random(seed)``, so the interval is deterministic), takes the mean of each, and
    returns the ``(1 − level)/2`` and ``(1 + level)/2`` percentiles of those means (linear
    interpolation, as ``numpy.percentile``). Source: Efron & Tibshirani, *An Introduction to
    the Bootstrap* (1993), ch. 13. With few inputs the interval is optimistic (too narrow).

    Args:
        values: one value per input (e.g. 0/1 exact matches, KL in nats); the interval is
            in the same unit.
        level: confidence level in (0, 1), e.g. 0.95.
        resamples: number of bootstrap samples, ≥ 1.
        seed: seed of the random generator.

    Returns:
        ``(low, high)`` with ``low ≤ high``. All values equal (or a single value) →
        ``(v, v)``. An ``inf`` value can make a bound ``inf``; a NaN value gives
        ``(nan, nan)``.

    Raises:
        ValueError: if ``values`` is empty, ``level`` is not in (0, 1) or ``resamples < 1``.
    """
    data = [float(v) for v in values]
    if not data:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be ≥ 1, got {resamples}")
    if any(math.isnan(v) for v in data):
        return (math.nan, math.nan)
    if all(v == data[0] for v in data):
        return (data[0], data[0])
    rng = random.Random(seed)
    n = len(data)
    means = sorted(sum(rng.choices(data, k=n)) / n for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    return (percentile(means, tail), percentile(means, 1.0 - tail))


def normal_quantile(q: float) -> float:
    """The ``q`` quantile of the standard normal distribution (``statistics.NormalDist().inv_cdf``).

    Raises:
        ValueError: ``q`` not in (0, 1).
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"a quantile needs q in (0, 1), got {q}")
    return NormalDist().inv_cdf(q)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _check_counts(successes: int, n: int) -> None:
    if isinstance(successes, bool) or isinstance(n, bool) or int(successes) != successes or int(n) != n:
        raise ValueError(f"counts must be integers, got {successes!r} of {n!r}")
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n] = [0, {n}], got {successes}")


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (``successes`` of ``n`` 0/1 outcomes).

    Source: E. B. Wilson, "Probable inference, the law of succession, and statistical inference",
    *Journal of the American Statistical Association* 22 (1927), 209-212. With ``p̂ = k/n`` and
    ``z`` the ``(1 + level)/2`` standard-normal quantile (1.95996 for 95%)::

        centre    = (p̂ + z²/(2n)) / (1 + z²/n)
        half      = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/(4n²))
        interval  = [centre − half, centre + half]

    It is the set of proportions ``p`` that a two-sided score test ``|p̂ − p| ≤ z·sqrt(p(1−p)/n)``
    does not reject. Unlike a bootstrap or the Wald interval it is not zero-width when every
    outcome agrees: 8 of 8 gives ``[n/(n + z²), 1] = [0.6756, 1]``, 0 of 8 ``[0, 0.3244]``.

    Args:
        successes: number of 1 outcomes ``k``, an integer in ``[0, n]``.
        n: number of outcomes, ≥ 1.
        level: two-sided confidence level in (0, 1); each bound is then a one-sided
            ``(1 + level)/2`` bound (97.5% for 95%).

    Returns:
        ``(low, high)``, fractions with ``0 ≤ low ≤ k/n ≤ high ≤ 1``.

    Raises:
        ValueError: ``n < 1``, ``successes`` outside ``[0, n]`` or not an integer, ``level`` not in (0, 1).
    """
    _check_counts(successes, n)
    _check_level(level)
    z = normal_quantile((1.0 + level) / 2.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def is_binary(values: Sequence[float]) -> bool:
    """Whether every value is 0 or 1 (a per-input 0/1 metric: answer match, accuracy, top-1 agreement)."""
    return all(v in (0, 1) for v in values)


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of the mean of per-input values: the Wilson score interval
    (:func:`wilson_interval`) when every value is 0 or 1, else the percentile bootstrap
    (:func:`bootstrap_ci`, fixed seed).

    Args:
        values: one value per input, at least one.
        level: confidence level in (0, 1).

    Returns:
        ``(low, high)`` in the unit of ``values``.

    Raises:
        ValueError: ``values`` is empty or ``level`` is not in (0, 1).
    """
    data = [float(v) for v in values]
    if not data:
        raise ValueError("mean_interval needs at least one value")
    if is_binary(data):
        return wilson_interval(int(sum(data)), len(data), level)
    return bootstrap_ci(data, level=level)


def wilson_inputs_needed(threshold: float, level: float = 0.95) -> float:
    """The fewest inputs whose Wilson lower bound reaches ``threshold`` when every input agrees
    (``n/(n + z²) ≥ t`` ⟺ ``n ≥ z²·t/(1 − t)``): 73 for 0.95 at 95%, 35 for 0.9. ``inf`` for ``t = 1``.

    Raises:
        ValueError: ``threshold`` not in [0, 1] or ``level`` not in (0, 1).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    _check_level(level)
    if threshold >= 1.0:
        return math.inf
    z = normal_quantile((1.0 + level) / 2.0)
    return float(math.ceil(z * z * threshold / (1.0 - threshold) - 1e-12))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact (conditional) McNemar test of paired 0/1 outcomes: two-sided p-value of "no difference".

    Of the ``m = b + c`` discordant pairs (``b``: 1 in the first run, 0 in the second; ``c``: the
    reverse), under the null hypothesis each is equally likely to go either way, so ``b ~ Binomial(m,
    1/2)``. ``p = min(1, 2 · Σ_{i ≤ min(b, c)} C(m, i) / 2^m)``; ``m = 0`` gives 1. Source: Q. McNemar,
    *Psychometrika* 12 (1947), 153-157; the exact binomial form as in Fagerland, Lydersen & Laake,
    *BMC Med. Res. Methodol.* 13:91 (2013). Computed in exact integer arithmetic. Example: ``b = 6,
    c = 1`` → ``2 · (1 + 7)/128 = 0.125``.

    Args:
        b, c: discordant pair counts, integers ≥ 0.

    Returns:
        The p-value in (0, 1].

    Raises:
        ValueError: a negative or non-integer count.
    """
    for v in (b, c):
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise ValueError(f"discordant counts must be integers ≥ 0, got {b!r}, {c!r}")
    b, c = int(b), int(c)
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**m)


def _binomial_pmf(i: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 1.0 if i == 0 else 0.0
    if p >= 1.0:
        return 1.0 if i == n else 0.0
    log = math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
    return math.exp(log)


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """``P(X ≥ k)`` for ``X ~ Binomial(n, p)`` (log-space terms, so large ``n`` does not overflow).

    Raises:
        ValueError: ``n < 1``, ``k`` outside ``[0, n]``, or ``p`` outside [0, 1].
    """
    _check_counts(k, n)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if k == 0:
        return 1.0
    return min(1.0, sum(_binomial_pmf(i, n, p) for i in range(k, n + 1)))


def clopper_pearson_lower(k: int, n: int, level: float = 0.95) -> float:
    """One-sided exact (Clopper-Pearson) lower confidence bound of a binomial proportion.

    The ``p_L`` with ``P(X ≥ k | n, p_L) = 1 − level`` (0 when ``k = 0``), found by bisection to 1e-12.
    It is the inversion of the exact one-sided binomial test: ``P(X ≥ k | n, p0) < 1 − level`` exactly
    when ``p0 < p_L``. Source: C. J. Clopper & E. S. Pearson, *Biometrika* 26 (1934), 404-413.
    Example: ``k = 1, n = 10`` at 95% → ``1 − 0.95^(1/10) = 0.00512``.

    Args:
        k: successes (here: inputs whose answer changed), in ``[0, n]``.
        n: trials, ≥ 1.
        level: one-sided confidence level in (0, 1).

    Returns:
        The bound, a fraction in ``[0, k/n]``.

    Raises:
        ValueError: bad counts or level.
    """
    _check_counts(k, n)
    _check_level(level)
    if k == 0:
        return 0.0
    alpha = 1.0 - level
    lo, hi = 0.0, k / n
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if binomial_upper_tail(k, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return lo


def _tango_restricted_q21(b: int, c: int, n: int, delta: float) -> float:
    """Restricted maximum-likelihood estimate of the probability of a (0, 1) pair under ``Δ = delta``."""
    a2 = 2.0 * n
    b1 = -b - c + (2.0 * n - b + c) * delta
    c0 = -c * delta * (1.0 - delta)
    disc = max(b1 * b1 - 4.0 * a2 * c0, 0.0)
    return max((-b1 + math.sqrt(disc)) / (2.0 * a2), 0.0)


def tango_score_z(b: int, c: int, n: int, delta: float) -> float:
    """Tango's score statistic for a paired difference of proportions ``Δ = p₁ − p₂ = q₁₀ − q₀₁``.

    With ``b`` pairs (1, 0), ``c`` pairs (0, 1) among ``n`` pairs and the null hypothesis ``Δ = delta``::

        Z = (b − c − n·delta) / sqrt(n · (2·q̃₀₁ + delta·(1 − delta)))

    where ``q̃₀₁`` is the restricted maximum-likelihood estimate of the (0, 1) probability under the null,
    the positive root of ``2n·q² + (−b − c + (2n − b + c)·delta)·q − c·delta·(1 − delta) = 0``. At
    ``delta = 0`` it is McNemar's ``(b − c)/sqrt(b + c)``. Source: T. Tango, "Equivalence test and
    confidence interval for the difference in proportions for the paired-sample design", *Statistics
    in Medicine* 17 (1998), 891-908; recommended by Fagerland, Lydersen & Laake, *Statistics in
    Medicine* 33 (2014), 2850-2875.

    Args:
        b, c: discordant pair counts.
        n: number of pairs, ≥ ``b + c`` and ≥ 1.
        delta: the difference under the null hypothesis, in (−1, 1).

    Returns:
        ``Z`` (large when the observed difference exceeds ``delta``); ±inf or 0 when the variance
        under the null is 0.

    Raises:
        ValueError: inconsistent counts, or ``delta`` outside [−1, 1].
    """
    if n < 1 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need 0 ≤ b, c and b + c ≤ n with n ≥ 1; got b={b}, c={c}, n={n}")
    if not -1.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [-1, 1], got {delta}")
    num = b - c - n * delta
    var = n * (2.0 * _tango_restricted_q21(b, c, n, delta) + delta * (1.0 - delta))
    if var <= 1e-300:
        return 0.0 if abs(num) < 1e-12 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def paired_difference_test(b: int, c: int, n: int, margin: float, level: float = 0.95) -> tuple[float, float]:
    """One-sided test that a paired difference of proportions exceeds ``margin`` (Tango's score test).

    Tests ``H0: Δ ≤ margin`` against ``H1: Δ > margin`` with ``Δ = q₁₀ − q₀₁`` (for ``lightkv check``:
    the share of inputs the uncompressed run answers correctly minus the compressed run's) and
    returns the one-sided p-value ``1 − Φ(Z(margin))`` (:func:`tango_score_z`) and the one-sided
    ``level`` lower confidence bound of ``Δ``: the ``delta`` with ``Z(delta) = z_level``, found by
    bisection on [−1, 1]. ``p < 1 − level`` exactly when the bound exceeds ``margin`` (up to the
    bisection's 1e-10).

    Args:
        b: pairs 1 in the first (reference) run and 0 in the second.
        c: pairs 0 in the first run and 1 in the second.
        n: number of pairs.
        margin: the largest acceptable difference, in [0, 1).
        level: one-sided confidence level in (0, 1).

    Returns:
        ``(p_value, lower_bound)``.

    Raises:
        ValueError: inconsistent counts, a margin outside [0, 1) or a level outside (0, 1).
    """
    _check_level(level)
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    z_m = tango_score_z(b, c, n, margin)
    p_value = 0.5 * math.erfc(z_m / math.sqrt(2.0))
    z = normal_quantile(level)
    lo, hi = -1.0, 1.0
    if tango_score_z(b, c, n, lo + 1e-12) < z:
        return (p_value, -1.0)
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if tango_score_z(b, c, n, mid) >= z:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return (p_value, lo)


def paired_bootstrap_ci(
    reference: Sequence[float], compared: Sequence[float], level: float = 0.95, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean paired difference ``compared − reference``.

    Inputs are resampled as pairs (the bootstrap of the per-input differences, :func:`bootstrap_ci`
    with a fixed seed, so the interval is deterministic); Efron & Tibshirani (1993), ch. 13.

    Args:
        reference, compared: one value per input, same length, same order (e.g. KL in nats).
        level: two-sided confidence level in (0, 1).
        resamples: bootstrap samples, ≥ 1.
        seed: seed of the random generator.

    Returns:
        ``(low, high)`` of the mean difference, in the unit of the values.

    Raises:
        ValueError: the sequences are empty or of different lengths, or bad ``level`` / ``resamples``.
    """
    if len(reference) != len(compared):
        raise ValueError(f"paired values need equal lengths, got {len(reference)} and {len(compared)}")
    return bootstrap_ci([float(y) - float(x) for x, y in zip(reference, compared)], level, resamples, seed)
