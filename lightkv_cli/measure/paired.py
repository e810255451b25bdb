"""Paired timing ratios: a method's time over the uncompressed model's on the same input in the same round,
with a bootstrap interval of their median. No torch.

The timing pass (:mod:`lightkv_cli.engine.sweep`) measures every run on the same inputs in rounds whose
run order is shuffled, so the two times of a pair were taken minutes apart at most, under the same load;
the ratio of a pair cancels what the input costs (its prompt length) and most of the drift of a shared
machine. The estimate is the median of the pair ratios; its interval is a percentile bootstrap of that
median over the pairs (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13), seeded so
that it is reproducible. Pairs of one input in different rounds are not independent, so with few inputs
the interval is optimistic (too narrow); it says how stable the median is, not more.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from lightkv_cli.scoring.stats import percentile


@dataclass(frozen=True)
class PairedRatio:
    """The median of paired ratios and its bootstrap interval.

    Attributes:
        median: median of the pair ratios (a unitless ratio: 0.8 is 20% faster than uncompressed).
        low, high: the 95% (by default) percentile-bootstrap interval of the median.
        n: pairs used (pairs with a missing or non-positive time are left out).
    """

    median: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        """Plain numbers for the results file."""
        return asdict(self)


def pair_ratios(times: Sequence[Sequence[float | None]], reference: Sequence[Sequence[float | None]]) -> list[float]:
    """Ratios ``times[u][r] / reference[u][r]`` for every input (or batch) ``u`` and round ``r`` both
    measured, in order; pairs with a missing time or a reference time ≤ 0 are left out.

    Raises:
        ValueError: ``times`` and ``reference`` do not have the same number of inputs.
    """
    if len(times) != len(reference):
        raise ValueError(f"paired times need the same inputs: {len(times)} against {len(reference)}")
    out = []
    for mine, ref in zip(times, reference):
        for a, b in zip(mine, ref):
            if a is not None and b is not None and b > 0 and math.isfinite(a) and math.isfinite(b):
                out.append(a / b)
    return out


def median_interval(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> PairedRatio:
    """The median of ``values`` and its percentile-bootstrap interval (``resamples`` draws with replacement
    of ``len(values)`` values from ``random.Random(seed)``).

    Raises:
        ValueError: ``values`` is empty or ``level`` is not in (0, 1).
    """
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("median_interval needs at least one value")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    med = percentile(data, 0.5)
    if data[0] == data[-1]:
        return PairedRatio(med, med, med, len(data))
    rng = random.Random(seed)
    n = len(data)
    meds = sorted(percentile(sorted(rng.choices(data, k=n)), 0.5) for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    return PairedRatio(med, percentile(meds, tail), percentile(meds, 1.0 - tail), n)


def paired_ratio(
    times: Sequence[Sequence[float | None]], reference: Sequence[Sequence[float | None]], seed: int = 0
) -> PairedRatio | None:
    """:func:`median_interval` of :func:`pair_ratios`; None when no pair was measured.

    Args:
        times: the method's times, ``[input][round]`` (ms; None: not measured).
        reference: the uncompressed run's times on the same inputs and rounds.
        seed: the bootstrap's seed.

    Raises:
        ValueError: ``times`` and ``reference`` do not have the same number of inputs.
    """
    ratios = pair_ratios(times, reference)
    return median_interval(ratios, seed=seed) if ratios else None
