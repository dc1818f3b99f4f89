"""When each benchmark request is sent: a Poisson process, or gamma-distributed gaps.

Gaps are drawn from Gamma(shape=burstiness, scale=1 / (rate x burstiness)): mean 1 / rate
whatever the burstiness, coefficient of variation 1 / sqrt(burstiness). burstiness = 1 is the
exponential distribution (a Poisson process); < 1 is burstier, > 1 more even, inf is a fixed
gap. As vLLM does, the cumulative times are then scaled so the last request is sent at exactly
num / rate: runs with different seeds offer the same load and their throughputs compare.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_times(
    num: int, request_rate: float, burstiness: float, rng: np.random.Generator
) -> list[float]:
    """Seconds from the start of the run at which request i is sent, non-decreasing."""
    if num < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num}")
    if not request_rate > 0:
        raise ValueError(
            f"--request-rate must be > 0 (inf sends everything at once), got {request_rate}"
        )
    if not burstiness > 0:
        raise ValueError(f"--burstiness must be > 0 (1.0 = Poisson), got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num
    if math.isinf(burstiness):
        gaps = np.full(num, 1.0 / request_rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num)
    times = np.cumsum(gaps)
    times *= (num / request_rate) / times[-1]
    return times.tolist()
