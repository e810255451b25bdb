"""Statistics over inputs and repeats: percentiles, spreads of repeated timings, bootstrap intervals.
No torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass


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
