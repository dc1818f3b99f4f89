"""Step-time model the SLO scheduler sizes prefill chunks with, calibrated at start-up.

prefill_s(n new tokens over c cached) = a + b*n + g*n*(c + n/2)
    dense work is linear in n; causal attention of n queries over c + n/2 keys on average.
decode_s(batch b, total context k)   = a_d + b_d*b + g_d*k
    dense work grows with the batch; attention reads every cached token once.
All terms are per SP group (the ranks split both). Fitted by least squares on a short profile
run; the planner's simulator uses the same model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class CostModel:
    prefill_fixed_s: float = 1e-3
    prefill_per_token_s: float = 1e-5
    prefill_per_pair_s: float = 1e-10
    decode_fixed_s: float = 1e-3
    decode_per_seq_s: float = 1e-4
    decode_per_ctx_token_s: float = 1e-8

    def prefill_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        pairs = new_tokens * (cached_tokens + new_tokens / 2)
        return self.prefill_fixed_s + self.prefill_per_token_s * new_tokens + self.prefill_per_pair_s * pairs

    def decode_s(self, batch: int, total_context: int) -> float:
        if batch == 0:
            return 0.0
        return self.decode_fixed_s + self.decode_per_seq_s * batch + self.decode_per_ctx_token_s * total_context

    def max_prefill_tokens(self, budget_s: float, cached_tokens: int, cap: int) -> int:
        """The largest chunk whose predicted time fits in budget_s (at least 0, at most cap)."""
        lo, hi = 0, cap
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.prefill_s(mid, cached_tokens) <= budget_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @staticmethod
    def fit(prefill_samples: list[tuple[int, int, float]],
            decode_samples: list[tuple[int, int, float]]) -> "CostModel":
        """prefill_samples: (new, cached, seconds); decode_samples: (batch, total_context, seconds)."""
        a = np.array([[1.0, n, n * (c + n / 2)] for n, c, _ in prefill_samples])
        pf = _nonneg_lstsq(a, np.array([s for *_, s in prefill_samples]))
        d = np.array([[1.0, b, k] for b, k, _ in decode_samples])
        dc = _nonneg_lstsq(d, np.array([s for *_, s in decode_samples]))
        return CostModel(*pf, *dc)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=1)

    @staticmethod
    def load(path: str) -> "CostModel":
        with open(path) as f:
            return CostModel(**json.load(f))


def _nonneg_lstsq(a: np.ndarray, y: np.ndarray, rounds: int = 8) -> list[float]:
    """Least squares in relative error with coefficients clamped at >= 0 (refit without the
    negative ones).

    Rows are scaled by 1/prediction, so short steps matter as much as long ones. Scaling by
    1/measurement instead would bias the fit low under noise: a step measured slow gets less
    weight than one measured fast (by about 2*sigma^2 for log-normal noise of sigma, 11% at the
    0.25 of a shared CPU). So the weights start at 1/measurement and are refined from the
    previous round's predictions (iteratively reweighted least squares; the fit is then of the
    mean step time, which the simulator's mean-one noise multiplies).
    """
    coef = np.zeros(a.shape[1])
    scale = np.maximum(y, 1e-6)
    for _ in range(rounds):
        w = 1.0 / scale
        active = list(range(a.shape[1]))
        coef = np.zeros(a.shape[1])
        while active:
            sol, *_ = np.linalg.lstsq(a[:, active] * w[:, None], y * w, rcond=None)
            if (sol >= 0).all():
                coef[active] = sol
                break
            active = [i for i, s in zip(active, sol) if s > 0]
        predicted = a @ coef
        if not (predicted > 0).all():
            break  # a zero prediction has no relative error to weigh by: keep this round's
        if np.allclose(predicted, scale, rtol=1e-6, atol=0):
            break
        scale = predicted
    return [float(c) for c in coef]
