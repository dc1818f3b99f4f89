"""The step plan rank 0 broadcasts on the control group, and what a step returns to rank 0.

It is compact by design: token ids and counts, never block ids (each rank's allocator places
blocks deterministically; see kv/cache.py) and never tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrefillChunk:
    seq_id: int
    token_ids: list[int]  # the chunk's tokens; each rank takes its zigzag share
    start_pos: int  # tokens of this sequence already cached (chunks before this one)
    want_logits: bool  # the prompt's last chunk: rank 0 samples the first output token
    # The whole prompt's length. Dynamic-NTK RoPE scales by sequence length; every chunk uses
    # the full length, so a chunked prompt gets the same rotations as a one-pass prefill.
    total_len: int = 0
    # Prompt logprobs: None, or k >= 0 (the chosen token's logprob and rank, plus the top k) for
    # every position of the chunk whose next token is known: each rank scores its own share.
    prompt_logprobs: int | None = None
    next_token_id: int | None = None  # the token after the chunk (None: the chunk ends the prompt)


@dataclass
class DecodeToken:
    seq_id: int
    token_id: int
    position: int
    owner_rank: int  # the rank that stores this token's K/V


@dataclass
class StepPlan:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[DecodeToken] = field(default_factory=list)
    free_seq_ids: list[int] = field(default_factory=list)  # drop these sequences' KV first
    # Then the engine's KV operations since the last plan, in its order (BlockManager.ops):
    # frees, renames (a finished sequence's KV kept as a cache entry), shared prefixes.
    kv_ops: list[tuple] = field(default_factory=list)
    shutdown: bool = False

    @property
    def is_noop(self) -> bool:
        return not (self.prefill or self.decode or self.free_seq_ids or self.kv_ops
                    or self.shutdown)
