"""Sampling parameters (vLLM's names, defaults and semantics) and the sampler.

The sampler runs on rank 0 only, on float32 logits. A request with a seed draws from its own
torch.Generator, so the same seed gives the same tokens whatever else is in the batch.

It cannot produce NaN, whatever the parameters (in their documented ranges) and logits: a NaN
probability would fail torch.multinomial, and on a GPU poison the device for every request.
- The logits are cleaned first: NaN is -inf (impossible), +inf the largest float32.
- The most likely token is subtracted before scaling, so it sits at 0 and every other token at
  <= 0 or -inf: dividing by a tiny temperature can only underflow to -inf, never reach +inf, and
  the softmax sums to >= 1.
- Each filter keeps that top token (top-p keeps it even when top_p rounds to 0 in float32), so
  at least one probability is 1 before normalisation.
- A temperature below GREEDY_TEMPERATURE is greedy (as vLLM: 1/temperature would overflow).
- A row with no finite logit at all is a row of equal logits: greedy takes the first token,
  sampling draws uniformly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sp_serve.engine.structured import StructuredOutputsParams, apply_bitmask

# vLLM's _SAMPLING_EPS: a temperature below this is greedy decoding.
GREEDY_TEMPERATURE = 1e-5
_F32_MAX = torch.finfo(torch.float32).max
_NEG_INF = float("-inf")
# torch.Generator.manual_seed takes [-2**63, 2**64).
_SEED_RANGE = (-2**63, 2**64)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the top one; 0: disabled
    presence_penalty: float = 0.0  # minus this from the logit of every token already generated
    frequency_penalty: float = 0.0  # minus this times the count of each generated token
    repetition_penalty: float = 1.0  # prompt or generated tokens: logit / this if > 0, else x this
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: none; k >= 0: chosen token's logprob plus the top k
    # None: none; k >= 0: every prompt token's logprob (but the first's) and rank, plus the top
    # k at each position, computed by the ranks that hold the prompt (engine/prompt_logprobs.py)
    prompt_logprobs: int | None = None
    min_tokens: int = 0  # eos and stop_token_ids cannot end the output before this many tokens
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits, each in [-100, 100]
    include_stop_str_in_output: bool = False  # the matched stop string ends the text, kept
    # JSON schema / JSON object / regex / choice / Lark grammar (engine/structured.py)
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.structured_outputs, dict):  # as vLLM takes it, a dict of the fields
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.logit_bias is not None and isinstance(self.logit_bias, dict):
            # JSON keys are strings ("1234"), as OpenAI sends them
            try:
                self.logit_bias = {int(t): b for t, b in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise ValueError("logit_bias keys must be token ids (integers)") from None
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (_is_number(self.temperature) and self.temperature >= 0.0,
             f"temperature must be a finite number >= 0, got {self.temperature!r}"),
            (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0,
             f"top_p must be in (0, 1], got {self.top_p!r}"),
            (isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0),
             f"top_k must be -1 (disabled) or >= 0, got {self.top_k!r}"),
            (_is_number(self.min_p) and 0.0 <= self.min_p <= 1.0,
             f"min_p must be in [0, 1], got {self.min_p!r}"),
            (_is_number(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            (_is_number(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            (_is_number(self.repetition_penalty) and self.repetition_penalty > 0.0,
             f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}"),
            (self.seed is None or (isinstance(self.seed, int)
                                   and _SEED_RANGE[0] <= self.seed < _SEED_RANGE[1]),
             f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}"),
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             f"logprobs must be an integer in [0, 20], got {self.logprobs!r}"),
            (self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                              and 0 <= self.prompt_logprobs <= 20),
             f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens,
             f"min_tokens must be an integer >= 0, got {self.min_tokens!r}"),
            (not isinstance(self.min_tokens, int) or not isinstance(self.max_tokens, int)
             or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens!r}) must be at most max_tokens ({self.max_tokens!r})"),
            (self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
                t >= 0 and _is_number(b) and -100.0 <= b <= 100.0
                for t, b in self.logit_bias.items())),
             "logit_bias maps token ids (>= 0) to biases in [-100, 100]"),
            (isinstance(self.include_stop_str_in_output, bool),
             "include_stop_str_in_output must be true or false"),
            (self.structured_outputs is None
             or isinstance(self.structured_outputs, StructuredOutputsParams),
             "structured_outputs must be a StructuredOutputsParams"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_logits_processors(self) -> bool:
        """Anything that changes the logits before the penalties (vLLM's order)."""
        return bool(self.logit_bias) or self.min_tokens > 0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of the chosen token (when logprobs were asked for)
    top: list[tuple[int, float]] | None = None  # the top-k (token, logprob)
    rank: int | None = None  # of the chosen token among the raw logits (1: the most likely)


class TokenCounts:
    """One sequence's tokens as the penalties need them, on the logits' device: which ids the
    prompt holds and how often each id was generated. Built once and updated per token, so a
    long prompt is not scanned again at every step."""

    def __init__(self, prompt_ids: list[int], vocab_size: int, device: torch.device) -> None:
        self.prompt_mask_v = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.prompt_mask_v[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True
        self.output_counts_v = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def add(self, token_id: int) -> None:
        self.output_counts_v[token_id] += 1


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private generator for a seeded request, so its draws do not depend on its neighbours."""
    if params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def plain_greedy(params: SamplingParams) -> bool:
    """Whether the token is the argmax of the raw logits and nothing else is asked for: greedy,
    no processor, penalty or grammar changes the logits, no logprobs."""
    return (params.greedy and not params.has_logits_processors and not params.has_penalties
            and params.structured_outputs is None and params.logprobs is None)


def greedy_tokens(rows_v: list[torch.Tensor]) -> list[int]:
    """sample()'s token for rows of plain_greedy requests, all at once: one device-to-host
    copy for the batch, where a token per call costs a device sync per sequence on a GPU."""
    return _clean(torch.stack(rows_v).float()).argmax(-1).tolist()


def sample(logits_v: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           counts: TokenCounts | None = None, banned: list[int] | None = None,
           bitmask: torch.Tensor | None = None) -> SampleResult:
    """One token from logits [vocab]: the grammar's bitmask (structured outputs), logit_bias,
    `banned` (the stop tokens while fewer than min_tokens were generated: the engine says which)
    at -inf, then penalties, then greedy, or temperature -> min-p -> top-k -> top-p -> draw
    (vLLM's order). Logprobs are of the raw logits, as vLLM reports them."""
    logits_v = _clean(logits_v.float())
    x_v = _processed_logits(logits_v, params, counts, banned, bitmask)
    if params.greedy:
        token = int(torch.argmax(x_v))
    else:
        probs_v = torch.softmax(_filtered(x_v, params), -1)
        token = int(torch.multinomial(probs_v, 1, generator=generator))
    if params.logprobs is None:
        return SampleResult(token)
    # A row with no finite logit gives NaN here; it means "impossible" like -inf does.
    logprobs_v = torch.log_softmax(logits_v, -1).nan_to_num(nan=_NEG_INF)
    top = []
    if params.logprobs > 0:
        values, ids = torch.topk(logprobs_v, min(params.logprobs, logprobs_v.shape[-1]))
        top = list(zip(ids.tolist(), values.tolist()))
    chosen = logprobs_v[token]
    return SampleResult(token, float(chosen), top, int((logprobs_v > chosen).sum()) + 1)


def distribution(logits_v: torch.Tensor, params: SamplingParams, counts: TokenCounts | None = None,
                 banned: list[int] | None = None, bitmask: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """The probabilities `sample` draws from (greedy: one-hot on the argmax), for tests."""
    x_v = _processed_logits(_clean(logits_v.float()), params, counts, banned, bitmask)
    if params.greedy:
        return torch.zeros_like(x_v).scatter_(0, torch.argmax(x_v)[None], 1.0)
    return torch.softmax(_filtered(x_v, params), -1)


def _processed_logits(logits_v: torch.Tensor, params: SamplingParams,
                      counts: TokenCounts | None, banned: list[int] | None,
                      bitmask: torch.Tensor | None = None) -> torch.Tensor:
    x_v = logits_v if bitmask is None else apply_bitmask(logits_v, bitmask)
    if params.logit_bias or banned:
        x_v = _clean(_processed(x_v, params, banned))
    if counts is not None:
        x_v = _clean(_penalize(x_v, params, counts))
    if bitmask is not None and x_v.max() == _NEG_INF:
        # The grammar comes first: when min_tokens' bans (or -inf logits) leave none of the
        # tokens it allows, draw among those tokens alike rather than outside the grammar.
        x_v = apply_bitmask(torch.zeros_like(logits_v), bitmask)
    return x_v


def _clean(x_v: torch.Tensor) -> torch.Tensor:
    """NaN is an impossible token (-inf); +inf the largest float, so that subtracting the
    maximum cannot compute inf - inf."""
    return torch.nan_to_num(x_v, nan=_NEG_INF, posinf=_F32_MAX, neginf=_NEG_INF)


def _processed(x_v: torch.Tensor, params: SamplingParams, banned: list[int] | None
               ) -> torch.Tensor:
    """vLLM's logit_bias (added) and min_tokens (the stop tokens at -inf) processors."""
    x_v = x_v.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=x_v.device)
        x_v[ids] += torch.tensor(list(params.logit_bias.values()), dtype=x_v.dtype,
                                 device=x_v.device)
    if banned:
        x_v[torch.tensor(banned, dtype=torch.long, device=x_v.device)] = _NEG_INF
    return x_v


def _penalize(x_v: torch.Tensor, params: SamplingParams, counts: TokenCounts) -> torch.Tensor:
    """vLLM's penalties. Extreme values overflow to +-inf or (-inf x 0) NaN, which _clean maps
    back to the ordered range: never a NaN past this point."""
    generated_v = counts.output_counts_v
    if params.repetition_penalty != 1.0:
        seen_v = counts.prompt_mask_v | (generated_v > 0)
        rp = params.repetition_penalty
        x_v = torch.where(seen_v, torch.where(x_v > 0, x_v / rp, x_v * rp), x_v)
    if params.frequency_penalty != 0.0:
        x_v = x_v - params.frequency_penalty * generated_v
    if params.presence_penalty != 0.0:
        x_v = x_v - params.presence_penalty * (generated_v > 0).float()
    return x_v


def _filtered(x_v: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Cleaned logits -> temperature-scaled logits with the filtered-out tokens at -inf; the top
    token is at 0 and always kept, so the softmax of the result is finite and sums to 1."""
    top = x_v.max()
    if top == _NEG_INF:  # no finite logit: all tokens alike
        return torch.zeros_like(x_v)
    possible_v = x_v > _NEG_INF
    # x - top is finite or underflows to -inf; dividing it by a finite temperature >= 1e-5 too
    # (a temperature past float32's range would make that -inf / inf = NaN).
    temperature = min(params.temperature, _F32_MAX)
    x_v = torch.where(possible_v, (x_v - top) / temperature, _NEG_INF)
    if params.min_p > 0.0:  # p / p_top = exp(x): compare in log space, no underflow
        x_v = x_v.masked_fill(x_v < math.log(params.min_p), _NEG_INF)
    if 0 < params.top_k < x_v.shape[-1]:
        kth = torch.topk(x_v, params.top_k).values[-1]
        x_v = x_v.masked_fill(x_v < kth, _NEG_INF)
    if params.top_p < 1.0:
        sorted_v, order = torch.sort(x_v, descending=True)
        probs_sorted_v = torch.softmax(sorted_v, -1)
        # Keep the smallest prefix whose mass reaches top_p: a token goes when the mass before
        # it already does. The top token always stays (top_p may round to 0 in float32).
        drop_sorted = (probs_sorted_v.cumsum(-1) - probs_sorted_v) >= params.top_p
        drop_sorted[0] = False
        x_v = x_v.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted),
                              _NEG_INF)
    return x_v
