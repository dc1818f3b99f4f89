"""The scheduler: pure policy over Sequences and the BlockManager (no tensors, injectable clock).

Policy "slo" (default): a step is a prefill step or a decode step, never both.
  - While sequences are decoding and prompts wait, steps alternate decode / prefill, and the
    prefill step is sized by the cost model so that decode + prefill fits in the TBT target:
    every running sequence gets its next token within --tbt-slo-ms.
  - Waiting prompts are ordered by slack: predicted remaining prefill time minus time waited,
    both relative to the TTFT target. A short prompt arriving behind a 100K-token one goes
    first; the long one ages, so it is never starved.
  - Prompts longer than the chunk budget are prefilled in chunks; each chunk attends in place to
    the sharded KV of the earlier ones.
Policy "fcfs" (baseline): first come, first served; each step mixes the whole decode batch with
as much of the oldest prompts as --max-num-batched-tokens allows.

Memory: a prompt is admitted only if every rank can hold its whole prompt; when a decode token
finds no room, the newest sequence is preempted (its KV dropped, to be recomputed later).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from sp_serve.engine.cost_model import CostModel
from sp_serve.engine.sequence import Sequence, SeqStatus
from sp_serve.kv.block_manager import BlockManager


@dataclass
class SchedulerConfig:
    policy: str = "slo"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    ttft_slo_s: float = 2.0
    tbt_slo_s: float = 0.2
    min_chunk_tokens: int = 32  # progress guarantee when decode alone eats the TBT budget


@dataclass
class ScheduledStep:
    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, start, end)
    decode: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, owner rank)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.prefill or self.decode)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, cost: CostModel,
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.blocks, self.cost, self.clock = config, blocks, cost, clock
        self.waiting: list[Sequence] = []  # prefill not done (incl. mid-prefill and preempted)
        self.running: list[Sequence] = []  # decoding, oldest first
        self.num_preemptions = 0
        self._last_was_prefill = False

    # ---- bookkeeping -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Finished or aborted: drop it and its blocks (the engine tells the ranks)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq.seq_id)

    def prefill_done(self, seq: Sequence) -> None:
        """The last chunk ran and its first token was sampled: the sequence decodes now."""
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- policy ------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        if self.config.policy == "fcfs":
            self._schedule_decode(step)
            budget = self.config.max_num_batched_tokens - len(step.decode)
            self._schedule_prefill(step, budget, sorted(self.waiting, key=lambda s: s.arrival_time))
            return step
        decoding = bool(self.running)
        prefilling = bool(self.waiting)
        if decoding and (not prefilling or self._last_was_prefill):
            self._schedule_decode(step)
        if step.is_empty and prefilling:
            budget = self.config.max_num_batched_tokens
            if self.running:
                ctx = sum(s.num_cached for s in self.running)
                left_s = self.config.tbt_slo_s - self.cost.decode_s(len(self.running), ctx)
                head = self._by_slack()[0]
                budget = max(self.config.min_chunk_tokens,
                             self.cost.max_prefill_tokens(left_s, head.num_cached, budget))
            self._schedule_prefill(step, budget, self._by_slack())
            if step.is_empty and decoding:  # prompts blocked on memory: keep decoding
                self._schedule_decode(step)
        self._last_was_prefill = bool(step.prefill)
        return step

    def _by_slack(self) -> list[Sequence]:
        now, slo = self.clock(), self.config.ttft_slo_s

        def slack(s: Sequence) -> float:
            return self.cost.prefill_s(s.remaining_prefill, s.num_cached) - (now - s.arrival_time) - slo

        return sorted(self.waiting, key=lambda s: (slack(s), s.arrival_time))

    def _schedule_prefill(self, step: ScheduledStep, budget: int, order: list[Sequence]) -> None:
        for seq in order:
            if budget <= 0:
                break
            if seq.num_cached == 0 and seq not in self._admitted():
                if len(self.running) + self._num_mid_prefill() >= self.config.max_num_seqs:
                    continue
                # Admit only what every rank can hold to the end of its prompt, keeping a block
                # per running sequence for its decode growth.
                shares = self.blocks.prefill_shares(seq.remaining_prefill)
                if not self.blocks.can_hold(seq.seq_id, shares, reserve_blocks=self._decode_reserve()):
                    continue
            n = min(budget, seq.remaining_prefill)
            shares = self.blocks.prefill_shares(n)
            if not self.blocks.can_hold(seq.seq_id, shares):
                if not self._preempt_for(seq, shares, step):
                    continue
            self.blocks.allocate(seq.seq_id, shares)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = self.clock()
            step.prefill.append((seq, seq.num_cached, seq.num_cached + n))
            seq.num_cached += n
            budget -= n

    def _admitted(self) -> list[Sequence]:
        return [s for s in self.waiting if s.num_cached > 0]

    def _num_mid_prefill(self) -> int:
        return sum(1 for s in self.waiting if s.num_cached > 0)

    def _decode_reserve(self) -> int:
        return -(-len(self.running) // self.blocks.world_size)

    def _schedule_decode(self, step: ScheduledStep) -> None:
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            owner = self.blocks.decode_rank(seq.seq_id)
            add = [0] * self.blocks.world_size
            add[owner] = 1
            while not self.blocks.can_hold(seq.seq_id, add):
                victim = self.running[-1]
                self._preempt(victim, step)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break  # it preempted itself: nothing newer is left
            self.blocks.allocate(seq.seq_id, add)
            step.decode.append((seq, owner))
            seq.num_cached += 1
            i += 1

    def _preempt_for(self, seq: Sequence, shares: list[int], step: ScheduledStep) -> bool:
        """Frees room for a prompt chunk by preempting newer decoding sequences."""
        while not self.blocks.can_hold(seq.seq_id, shares):
            newer = [s for s in self.running if s.arrival_time > seq.arrival_time]
            if not newer:
                return False
            self._preempt(newer[-1], step)
        return True

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        self.running.remove(seq)
        step.decode = [(s, r) for s, r in step.decode if s is not seq]
        step.preempted.append(seq)
        self.blocks.free(seq.seq_id)
        seq.reset_for_recompute()
        self.waiting.append(seq)
        self.num_preemptions += 1
