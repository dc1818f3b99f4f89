"""Step-time model the SLO scheduler sizes prefill chunks with, calibrated at start-up.

A step is one forward pass over its prompt chunks (n new tokens over c cached, each) and its
decode batch (b sequences holding k context tokens in all):

    step_s = step_fixed                                   reading the weights, per-layer overhead
           + sum over chunks of  chunk_fixed + t*n + g*n*(c + n/2)
                                  its collectives; dense work; causal attention pairs
           + d*b + e*k                                    decode rows; decode attention reads

All terms are per SP group (the ranks split the prompt work). On a CPU the fixed cost is most
of a small step (a pass over the weights is memory-bound), which is why a decode batch riding
along a prompt chunk costs little more than the chunk, and why chunks must not be cut small.
Fitted by non-negative least squares on a short profile run (`LLMEngine.calibrate`) or on a
server's step log; the planner's simulator uses the same model.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

# A step as the fit sees it: chunks [(new, cached)], decode batch, decode context, seconds.
StepSample = tuple[Sequence[tuple[int, int]], int, int, float]


@dataclass
class CostModel:
    step_fixed_s: float = 1e-3
    chunk_fixed_s: float = 1e-4
    prefill_per_token_s: float = 1e-5
    prefill_per_pair_s: float = 1e-10
    decode_per_seq_s: float = 1e-4
    decode_per_ctx_token_s: float = 1e-8

    def chunk_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """What one prompt chunk adds to a step."""
        if new_tokens <= 0:
            return 0.0
        pairs = new_tokens * (cached_tokens + new_tokens / 2)
        return self.chunk_fixed_s + self.prefill_per_token_s * new_tokens + self.prefill_per_pair_s * pairs

    def decode_part_s(self, batch: int, total_context: int) -> float:
        """What a decode batch adds to a step."""
        return self.decode_per_seq_s * batch + self.decode_per_ctx_token_s * total_context if batch else 0.0

    def step_s(self, chunks: Iterable[tuple[int, int]], batch: int = 0, total_context: int = 0) -> float:
        """A step's seconds; 0 for an empty one. A step with anything in it costs at least the
        fixed part, whatever its other terms fitted to (a fit can zero the decode terms)."""
        chunks = [(n, c) for n, c in chunks if n > 0]
        if not chunks and not batch:
            return 0.0
        return (self.step_fixed_s + sum(self.chunk_s(n, c) for n, c in chunks)
                + self.decode_part_s(batch, total_context))

    def prefill_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """A step of one prompt chunk alone."""
        return self.step_s([(new_tokens, cached_tokens)])

    def decode_s(self, batch: int, total_context: int) -> float:
        """A step of a decode batch alone."""
        return self.step_s([], batch, total_context)

    def max_prefill_tokens(self, budget_s: float, cached_tokens: int, cap: int) -> int:
        """The largest chunk whose chunk_s fits in budget_s (at least 0, at most cap)."""
        lo, hi = 0, cap
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.chunk_s(mid, cached_tokens) <= budget_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @staticmethod
    def fit(steps: list[StepSample], weights: Sequence[float] | None = None) -> "CostModel":
        """Least squares (relative error, non-negative) over measured steps; `weights` (one per
        step, default 1) scale each step's relative error."""
        rows = [_features(chunks, b, k) for chunks, b, k, _ in steps]
        coef = _nonneg_lstsq(np.array(rows, dtype=float), np.array([s for *_, s in steps], dtype=float),
                             None if weights is None else np.asarray(weights, dtype=float))
        return CostModel(*coef)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=1)

    @staticmethod
    def load(path: str) -> "CostModel":
        with open(path) as f:
            saved = json.load(f)
        if "prefill_fixed_s" in saved:  # saved before steps carried prefill and decode together
            step_fixed = saved.pop("decode_fixed_s")
            saved["chunk_fixed_s"] = max(0.0, saved.pop("prefill_fixed_s") - step_fixed)
            saved["step_fixed_s"] = step_fixed
        known = {f.name for f in fields(CostModel)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise ValueError(f"{path}: not a cost model (unknown keys {unknown}); save one with "
                             "sp_serve.planner.simulator.calibrate_cost_model or CostModel.save")
        return CostModel(**saved)


def _features(chunks: Sequence[tuple[int, int]], batch: int, context: int) -> list[float]:
    return [1.0, float(len(chunks)), float(sum(n for n, _ in chunks)),
            float(sum(n * (c + n / 2) for n, c in chunks)), float(batch), float(context)]


def _nonneg_lstsq(a: np.ndarray, y: np.ndarray, row_weights: np.ndarray | None = None,
                  rounds: int = 8) -> list[float]:
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
        w = 1.0 / scale if row_weights is None else row_weights / scale
        active = [i for i in range(a.shape[1]) if a[:, i].any()]
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
