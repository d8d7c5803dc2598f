"""Aggregate numbers: the mean of per-image scores and its percentile-bootstrap 95% interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval over ``n`` values (``low == high == mean`` when n == 1)."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def bootstrap_interval(
    values: Sequence[float], *, samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of ``values`` and the percentile-bootstrap interval of the mean.

    ``samples`` resamples of size n are drawn with replacement (numpy, seeded: the same values give
    the same interval); the interval is the (1-confidence)/2 and (1+confidence)/2 quantiles of their
    means. Written with numpy rather than scipy.stats.bootstrap, which is not a dependency here.
    """
    import numpy as np

    data = np.asarray([float(v) for v in values], dtype=np.float64)
    if data.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    if not np.all(np.isfinite(data)):
        raise ValueError("bootstrap_interval: values must be finite numbers")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(data.mean())
    if data.size == 1:
        return Interval(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    # Quantiles of resampled means can miss the sample mean by rounding when all values are equal.
    return Interval(mean, min(float(low), mean), max(float(high), mean), int(data.size))


def finite(values: Sequence[float | None]) -> list[float]:
    """The values that are numbers (scorers give None where they do not apply)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]
