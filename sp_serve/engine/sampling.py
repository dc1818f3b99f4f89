"""Sampling parameters (vLLM's names and defaults) and the sampler.

The sampler runs on rank 0 only, on float32 logits. A request with a seed draws from its own
torch.Generator, so the same seed gives the same tokens whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: none; k >= 0: chosen token's logprob plus the top k

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0),
             f"top_k must be -1 (disabled) or >= 0, got {self.top_k!r}"),
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             f"logprobs must be an integer in [0, 20], got {self.logprobs!r}"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of the chosen token (when logprobs were asked for)
    top: list[tuple[int, float]] | None = None  # the top-k (token, logprob)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private generator for a seeded request, so its draws do not depend on its neighbours."""
    if params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample(logits_v: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> SampleResult:
    """One token from float32 logits [vocab]: greedy, or temperature -> top-k -> top-p."""
    if params.greedy:
        token = int(torch.argmax(logits_v))
    else:
        scaled_v = logits_v / params.temperature
        if params.top_k > 0 and params.top_k < scaled_v.shape[-1]:
            kth = torch.topk(scaled_v, params.top_k).values[-1]
            scaled_v = scaled_v.masked_fill(scaled_v < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_v, order = torch.sort(scaled_v, descending=True)
            cum = torch.softmax(sorted_v, -1).cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop_sorted = (cum - torch.softmax(sorted_v, -1)) >= params.top_p
            scaled_v = scaled_v.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted),
                                            float("-inf"))
        probs_v = torch.softmax(scaled_v, -1)
        token = int(torch.multinomial(probs_v, 1, generator=generator))
    if params.logprobs is None:
        return SampleResult(token)
    logprobs_v = torch.log_softmax(logits_v.float(), -1)
    top = []
    if params.logprobs > 0:
        values, ids = torch.topk(logprobs_v, params.logprobs)
        top = list(zip(ids.tolist(), values.tolist()))
    return SampleResult(token, float(logprobs_v[token]), top)
