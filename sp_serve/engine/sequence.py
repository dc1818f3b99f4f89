"""A request's state as the engine sees it. No tensors."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from sp_serve.engine.protocol import TokenLogprob
from sp_serve.engine.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # prefill not finished (never started, mid-way, or preempted)
    RUNNING = "running"  # decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_cached: int = 0  # tokens whose K/V sit in the cache
    # Tokens the prefill phase must cover: the prompt, or after a preemption (recompute) the
    # prompt plus every token generated so far.
    prefill_target: int = 0
    first_scheduled_time: float | None = None
    last_token_time: float | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    # params.prompt_logprobs set: one entry per prompt token once prefilled (the first is None)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at (last) admission
    prefix_hint: int = 0  # ... or expected there when it arrived (the scheduler's cost estimate)

    def __post_init__(self) -> None:
        self.prefill_target = self.prefill_target or len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def remaining_prefill(self) -> int:
        return self.prefill_target - self.num_cached if self.status is SeqStatus.WAITING else 0

    @property
    def uncached_prefill(self) -> tuple[int, int]:
        """(tokens left to compute, tokens before them): for a prompt not admitted yet, the
        part the prefix cache is expected not to hold."""
        hint = self.prefix_hint if self.num_cached == 0 and self.status is SeqStatus.WAITING else 0
        return self.remaining_prefill - hint, self.num_cached + hint

    def prefill_tokens(self, start: int, end: int) -> list[int]:
        return self.all_token_ids[start:end]

    def reset_for_recompute(self) -> None:
        self.status = SeqStatus.WAITING
        self.num_cached = 0
        self.prefill_target = self.num_tokens
        self.num_preemptions += 1
