"""The scheduler: pure policy over Sequences and the BlockManager (no tensors, injectable clock).

Both policies run every decoding sequence in every step; a step may also carry prompt chunks.
The worker runs the decode batch and the chunks in one forward pass (one read of the weights)
but keeps their attention apart: ring attention for the chunks, sharded-KV partials for the
decode batch.

Policy "slo" (default), in four rules:
  1. A step that yields tokens (anything is decoding, or a waiting prompt is short enough to
     finish within the TBT target) is sized to that target: every running sequence gets its
     next token within --tbt-slo-ms. A step of prefill alone is sized to half the TTFT target: a prompt arriving
     mid-step waits at most that long for its own step, and big steps spend little on a
     step's fixed cost (a lone long prompt is prefilled in few, large chunks).
  2. Prompt chunks fill the step's time in priority order: least predicted remaining prefill
     first, minus the prefill time that went to newer prompts while it waited (aging). Short
     prompts pass a long one; the long one ages only while overtaken, and once aging puts it
     (or several) first, those take at most half of each step, the short ones the rest (and
     what the short ones do not need goes to them too).
  3. Times come from the cost model calibrated at start-up and refit, as the engine runs, on
     the last 256 steps it measured on the scheduler's clock (StepTimeModel), so it is this
     server's, under its load. A step is planned at the target divided by the slowest
     measured/predicted ratio of the last 128 steps of its kind (decode, mixed, prefill
     alone): a machine's noise makes about one step in 129 miss the TBT target (a p99).
  4. Prompts are not starved for the TBT target's sake. When the decode part alone overruns
     the target at the median ratio (a target this machine cannot meet at this batch), every step
     misses it whatever it carries: prompts get as much time as the decode part, half the
     engine's time. When a waiting prompt is late (it has waited longer than the TTFT target
     plus what its prefill alone takes), the engine is not keeping up with both promises:
     prompts get at least what the target leaves at the model's typical step, up to as much
     as the decode part, so the TBT target then holds for the typical step, not the p99 one,
     and a noisy machine cannot take more than that from prefill (half the engine's time when
     the decode part is at most half the target). Otherwise a step
     gives prompts what the p99 plan leaves, and a first chunk of 32 tokens when not one
     token fits (progress).
Policy "fcfs" (baseline): first come, first served; each step carries the whole decode batch and
as much of the oldest prompts as --max-num-batched-tokens allows.

Memory: a prompt is admitted only if every rank can hold its whole prompt beside the rest of the
prompts already admitted; admission follows the policy's order, and one that does not fit holds
back the ones behind it. When a decode token or a prompt chunk finds no room, the newest
sequence holding KV (decoding or mid-prefill) is preempted: its KV is dropped, to be recomputed
later, or with --preemption-mode swap copied to the host pools when they have room and the copy
is predicted cheaper than the recompute; swapped sequences come back (oldest first) as soon as
they fit, and a new prompt is admitted beside them only when they can all still come back once
the sequences older than them are done. The oldest sequence can always go on, so the scheduler
never stalls.

Prefix caching (when the BlockManager has it): a prompt admitted shares the longest prefix a
holder has computed (a finished sequence's cache entry, or a live sequence) and prefills only the
rest; prompts are costed by their uncached part (the prefix they are expected to find when they
arrive). A prompt that would find most of itself in a prompt still being prefilled (n > 1
siblings, the same document asked twice at once) waits for it instead of computing it again.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sp_serve.engine.cost_model import CostModel, StepSample
from sp_serve.engine.sequence import SeqStatus, Sequence
from sp_serve.kv.block_manager import BlockManager
from sp_serve.kv.prefix_cache import GROUP, common_prefix_len


@dataclass
class SchedulerConfig:
    policy: str = "slo"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    ttft_slo_s: float = 2.0
    tbt_slo_s: float = 0.2
    # A prompt's first chunk in a step when not even one token fits the step's prefill time
    # (a chunk deep in a very long context): progress whatever the prediction.
    min_chunk_tokens: int = 32
    # Longest predicted step of prefill alone (None: half the TTFT target). A prompt arriving
    # mid-step waits for the step; longer steps amortise the per-step cost better.
    max_prefill_step_s: float | None = None
    # Preemption (kv/block_manager.py): "recompute" drops the victim's KV; "swap" copies it to
    # the host pools when they have room and the copy (out and back in) is predicted to take
    # less than prefilling it again. swap_s_per_token: predicted seconds to copy one token's KV
    # one way on one rank (None: swap whenever the host has room, e.g. uncalibrated costs).
    preemption_mode: str = "recompute"
    swap_s_per_token: float | None = None


@dataclass
class ScheduledStep:
    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, start, end)
    decode: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, owner rank)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.prefill or self.decode)

    @property
    def kind(self) -> str:
        """decode | mixed | prefill (the StepTimeModel kinds); '' when empty."""
        if self.decode:
            return "mixed" if self.prefill else "decode"
        return "prefill" if self.prefill else ""


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, cost: CostModel,
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.blocks, self.clock = config, blocks, clock
        self.step_time = StepTimeModel(cost)
        self.waiting: list[Sequence] = []  # prefill not done (incl. mid-prefill and preempted)
        self.running: list[Sequence] = []  # decoding, oldest first
        self.swapped: list[Sequence] = []  # preempted to the host pools, KV kept there
        self.num_preemptions = 0
        # Seconds of prefill a waiting sequence saw go to newer ones: its aging credit.
        self._passed_over_s: dict[int, float] = {}
        # (kind, predicted s, start, (chunks [(new, cached)], decode batch, decode context)):
        # the step in flight, measured at the next schedule()
        self._last_step: tuple[str, float, float, tuple[list[tuple[int, int]], int, int]] | None = None
        # Called with every measured step's shape and seconds (`sp-serve serve --step-log`).
        self.step_observer: Callable[[dict], None] | None = None

    @property
    def cost(self) -> CostModel:
        """The cost model steps are planned with (rule 3): refit as steps are measured."""
        return self.step_time.model

    @cost.setter
    def cost(self, cost: CostModel) -> None:
        """A new calibration: what was measured against the old one is dropped."""
        self.step_time = StepTimeModel(cost)

    # ---- bookkeeping -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if not self.num_unfinished:  # the engine was idle: the time since the last step is no step's
            self._last_step = None
        if _shares_prefix(self.blocks, seq):  # the part it is expected to find cached
            hit = self.blocks.match(seq.prefill_tokens(0, seq.prefill_target))
            seq.prefix_hint = hit[1] if hit else 0
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Finished or aborted: drop it and its blocks (the engine tells the ranks)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.swapped:
            self.swapped.remove(seq)
        # every token counted in num_cached was computed by a step that ran: a cache entry
        self.blocks.free(seq.seq_id, seq.all_token_ids[:seq.num_cached]
                         if self.blocks.enable_prefix_caching else None)
        self._passed_over_s.pop(seq.seq_id, None)

    def prefill_done(self, seq: Sequence) -> None:
        """The last chunk ran and its first token was sampled: the sequence decodes now."""
        self.waiting.remove(seq)
        self._passed_over_s.pop(seq.seq_id, None)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    # ---- policy ------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        now = self.clock()
        if self._last_step is not None:  # the engine ran the last step and came straight back
            kind, predicted_s, started, (chunks, batch, context) = self._last_step
            measured_s = now - started
            self.step_time.observe(kind, (chunks, batch, context, measured_s))
            now = self.clock()  # a refit's own time is not the next step's
            if self.step_observer is not None:
                self.step_observer({"chunks": [list(c) for c in chunks], "decode": [batch, context],
                                    "kind": kind, "predicted_s": predicted_s,
                                    "measured_s": measured_s})
        step = self._schedule()
        self._last_step = None
        if not step.is_empty:
            shape = ([(b - a, a) for _, a, b in step.prefill], len(step.decode),
                     sum(s.num_cached for s, _ in step.decode))
            self._last_step = (step.kind, self.cost.step_s(*shape), now, shape)
        return step

    def predicted_s(self, step: ScheduledStep) -> float:
        """The cost model's time for a step."""
        return self.cost.step_s([(b - a, a) for _, a, b in step.prefill], len(step.decode),
                                sum(s.num_cached for s, _ in step.decode))

    def _schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        if self.blocks.enable_prefix_caching:  # what the last step computed is shareable now
            for seq in self.running + self._mid_prefill():
                self.blocks.publish(seq.seq_id, seq.num_cached, lambda s=seq: s.all_token_ids)
        self._swap_in(step)
        self._schedule_decode(step)
        budget = self.config.max_num_batched_tokens - len(step.decode)
        if self.config.policy == "fcfs":
            self._schedule_prefill(step, budget, sorted(self.waiting, key=_age))
            return step
        if not self.waiting:
            return step
        order, aged = self._by_slack()
        kind = "mixed" if step.decode else "prefill"
        limit_s = self._step_limit_s(step, order)
        # The limit in the cost model's seconds, which measured steps show run slow or fast;
        # less what the step costs before any chunk.
        fixed_s = self.cost.step_fixed_s + self.cost.decode_part_s(
            len(step.decode), sum(s.num_cached for s, _ in step.decode))
        time_left_s = limit_s / self.step_time.scale(kind) - fixed_s
        if step.decode:  # rule 4
            if fixed_s * self.step_time.typical(kind) >= limit_s:  # the decode part alone overruns
                time_left_s = fixed_s
            elif self._a_prompt_is_late():  # both promises cannot be kept: split the engine
                time_left_s = max(time_left_s, min(fixed_s, limit_s - fixed_s))
        self._schedule_prefill(step, budget, order, time_left_s, aged)
        return step

    def _a_prompt_is_late(self) -> bool:
        """Whether a waiting prompt has waited longer than the TTFT target plus what its prefill
        alone would take: the engine is not keeping up with the prompts while it keeps the TBT
        target at p99. A sequence preempted by recompute (it has output already) is not a
        prompt waiting for its first token: memory pressure alone does not make one late."""
        now = self.clock()
        return any(not s.output_token_ids and now - s.arrival_time > self.config.ttft_slo_s
                   + self.cost.prefill_s(s.prefill_target - s.prefix_hint, s.prefix_hint)
                   for s in self.waiting)

    def _step_limit_s(self, step: ScheduledStep, order: list[Sequence]) -> float:
        """Rule 1: the TBT target for a step that yields tokens (something decodes, or a
        waiting prompt is short enough to get its first token from this step), else half the
        TTFT target."""
        scale = self.step_time.scale("prefill")
        if step.decode or any(self.cost.prefill_s(*s.uncached_prefill) * scale
                              <= self.config.tbt_slo_s for s in order):
            return self.config.tbt_slo_s
        if self.config.max_prefill_step_s is not None:
            return self.config.max_prefill_step_s
        return self.config.ttft_slo_s / 2

    def _by_slack(self) -> tuple[list[Sequence], set[int]]:
        """Waiting prompts, most urgent first: predicted remaining prefill time minus the prefill
        time that went to newer prompts while it waited (shortest remaining first, with aging).

        Only being overtaken ages a prompt. Time waited since arrival would not do: a long
        prompt prefilled in small chunks between decode steps gains a second of it every
        second, soon outranks every short prompt arriving, and they queue behind it as under
        FCFS. A long prompt that gets a chunk in every step is not starved and does not age;
        one that short prompts keep crowding out ages until it goes first, and then, as its
        remaining time only shrinks, it keeps going.

        Also returns the ids of the prompts that aging put ahead of one with less left: together
        they get at most half of a step, the rest goes on by priority, so long prompts that have
        earned their turn do not hold up short ones for the whole of their prefill either."""
        scale = self.step_time.scale("prefill")  # remaining time in measured seconds

        def remaining_s(s: Sequence) -> float:
            return self.cost.prefill_s(*s.uncached_prefill) * scale

        def priority(s: Sequence) -> tuple[float, tuple[float, int]]:
            return remaining_s(s) - self._passed_over_s.get(s.seq_id, 0.0), _age(s)

        order = sorted(self.waiting, key=priority)
        aged, least_after = set(), float("inf")
        for seq in reversed(order):
            left = remaining_s(seq)
            if left > least_after:
                aged.add(seq.seq_id)
            least_after = min(least_after, left)
        return order, aged

    def _schedule_prefill(self, step: ScheduledStep, budget: int, order: list[Sequence],
                          time_left_s: float | None = None, aged: frozenset[int] | set[int] = frozenset()
                          ) -> None:
        """Chunks of the prompts in `order`, at most `budget` tokens in all and, when time_left_s
        is given, predicted to take at most that long (the chunks of a step run one after the
        other, each with its own cached context, so each is costed on its own). The prompts in
        `aged` get at most half of the tokens and of the time between them, or more when the
        others need less (their whole remaining prefill fits in the rest)."""
        admitting = True
        aged_tokens = budget // 2
        aged_s = None if time_left_s is None else time_left_s / 2
        if aged:  # what the others would take, at most: the rest is the aged prompts' too
            others = [s for s in order if s.seq_id not in aged and s not in step.preempted]
            aged_tokens = max(aged_tokens, budget - sum(s.remaining_prefill for s in others))
            if time_left_s is not None:
                others_s = sum(self.cost.chunk_s(s.remaining_prefill, s.num_cached) for s in others)
                aged_s = max(aged_s, time_left_s - others_s)
        for seq in order:
            if budget <= 0:
                break
            if seq in step.preempted:  # dropped by this very step: not back before the next
                continue
            if seq.num_cached == 0:  # not admitted yet (new, or preempted)
                if not admitting or len(self.running) + self._num_mid_prefill() >= self.config.max_num_seqs:
                    continue
                if self.swapped and not self._swapped_can_come_back(seq):
                    admitting = False
                    continue
                # Admit only what every rank can hold to the end of its prompt, beside the rest
                # of the prompts already admitted and a block per running sequence for its
                # decode growth. Admission goes in priority order: one that does not fit holds
                # back those behind it, so a stream of small prompts cannot starve a big one.
                admitted = self._admit(seq)
                if admitted is None:  # waits for a prompt in flight that computes its prefix
                    continue
                if not admitted:
                    admitting = False
                    continue
            n = min(budget, seq.remaining_prefill)
            limit_s = time_left_s
            if seq.seq_id in aged:
                n = min(n, aged_tokens)
                limit_s = None if aged_s is None else min(aged_s, time_left_s)
                if n <= 0 or (limit_s is not None and limit_s <= 0 and step.prefill):
                    continue
            if limit_s is not None:
                fit = self.cost.max_prefill_tokens(limit_s, seq.num_cached, n)
                if fit == 0 and step.prefill:
                    if seq.seq_id in aged:  # its half is spent; the other half is not
                        continue
                    break
                # Progress guarantee: the first chunk runs even when no token fits its time.
                n = fit or min(n, self.config.min_chunk_tokens)
            shares = self.blocks.prefill_shares(n)
            if not self.blocks.can_hold(seq.seq_id, shares) and not self._preempt_for(seq, shares, step):
                continue
            self.blocks.allocate(seq.seq_id, shares)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = self.clock()
            step.prefill.append((seq, seq.num_cached, seq.num_cached + n))
            chunk_s = self.cost.chunk_s(n, seq.num_cached)
            if time_left_s is not None:
                time_left_s -= chunk_s
            if seq.seq_id in aged:
                aged_tokens -= n
                aged_s = None if aged_s is None else aged_s - chunk_s
            seq.num_cached += n
            budget -= n
        self._age_passed_over(step)

    def _admit(self, seq: Sequence) -> bool | None:
        """Takes the sequence in: shares its longest cached prefix when there is one (its
        num_cached jumps to it) and checks every rank can hold the rest. False: it does not
        fit; None: it should wait for a prompt being prefilled that will hold its prefix."""
        reserve = self._reserved_blocks()
        blocks = self.blocks
        if _shares_prefix(blocks, seq):
            tokens = seq.prefill_tokens(0, seq.prefill_target)
            hit = blocks.match(tokens)
            cached = hit[1] if hit else 0
            if self._in_flight_holds_more(seq, tokens, cached):
                return None
            if hit is not None:
                holder, cached = hit
                rest = blocks.prefill_shares(seq.prefill_target - cached)
                lens = blocks.share_cost(holder, cached, rest, reserve)
                if lens is not None:
                    blocks.share(seq.seq_id, holder, cached, lens)
                    seq.num_cached = seq.num_cached_tokens = cached
                    blocks.prefix_cache_queries += seq.prefill_target
                    blocks.prefix_cache_hits += cached
                    return True
            if not blocks.can_hold(seq.seq_id, blocks.prefill_shares(seq.prefill_target), reserve):
                return False
            seq.num_cached_tokens = 0
            blocks.prefix_cache_queries += seq.prefill_target
            return True
        seq.num_cached_tokens = 0
        return blocks.can_hold(seq.seq_id, blocks.prefill_shares(seq.remaining_prefill), reserve)

    def _swapped_can_come_back(self, seq: Sequence) -> bool:
        """While sequences are swapped out: whether admitting this prompt still lets every one
        of them come back once the sequences older than the oldest of them are done. On every
        rank, the prompt's blocks, the blocks of every live sequence newer than the oldest
        swapped one, what running and admitted sequences have spoken for (`_reserved_blocks`)
        and every swapped sequence's blocks (and a block for its next token) must fit in the
        pool. Blocks that sequences older than the oldest swapped one hold are not counted:
        the swapped ones wait for them anyway.

        It cannot starve a swapped sequence: once no live sequence is older than the oldest
        swapped one, its blocks fit now whenever this holds (the live ones hold at least the
        pool less its free blocks), and `_swap_in` at the start of the step would have
        brought it back; so from then on no prompt is admitted before it is back."""
        blocks = self.blocks
        oldest = _age(min(self.swapped, key=_age))
        use = [a + b for a, b in zip(blocks.extra_blocks(seq.seq_id, blocks.prefill_shares(
            seq.remaining_prefill)), self._reserved_blocks())]
        for live in self.running + self._mid_prefill():
            if _age(live) > oldest:
                use = [u + len(pool.table(live.seq_id)) for u, pool in zip(use, blocks.pools)]
        for out in self.swapped:
            token = int(out.status is SeqStatus.RUNNING)
            use = [u + n + token for u, n in zip(use, blocks.swap_in_blocks(out.seq_id))]
        return all(u <= blocks.blocks_per_rank for u in use)

    def _in_flight_holds_more(self, seq: Sequence, tokens: list[int], cached: int) -> bool:
        """Whether a prompt now being prefilled will compute at least half of what this one
        lacks (and a group of tokens or more) beyond the `cached` prefix found now."""
        lacking = len(tokens) - 1 - cached
        for other in self._mid_prefill():
            if other is not seq:
                common = common_prefix_len(other.prefill_tokens(0, other.prefill_target), tokens)
                if min(common, len(tokens) - 1) - cached >= max(GROUP, lacking / 2):
                    return True
        return False

    def _age_passed_over(self, step: ScheduledStep) -> None:
        """Credits every waiting prompt with the time this step spends on newer ones: it was
        overtaken. Only newcomers jumping ahead is starvation; waiting behind an older prompt is
        first come, first served, and earns nothing (else a long prompt waiting behind another
        long one would then outrank every short prompt for as long as it had waited)."""
        scale = self.step_time.scale(step.kind)
        chunks = [(_age(s), self.cost.chunk_s(b - a, a) * scale) for s, a, b in step.prefill]
        served = {s.seq_id for s, _, _ in step.prefill}
        for seq in self.waiting:
            if seq.seq_id not in served:
                overtaken_s = sum(t for age, t in chunks if age > _age(seq))
                if overtaken_s:
                    self._passed_over_s[seq.seq_id] = self._passed_over_s.get(seq.seq_id, 0.0) + overtaken_s

    def _mid_prefill(self) -> list[Sequence]:
        return [s for s in self.waiting if s.num_cached > 0]

    def _num_mid_prefill(self) -> int:
        return sum(1 for s in self.waiting if s.num_cached > 0)

    def _reserved_blocks(self) -> list[int]:
        """Blocks per rank spoken for: the rest of every admitted prompt, and one per running
        sequence (spread over the ranks) for its next decode token."""
        reserved = [-(-len(self.running) // self.blocks.world_size)] * self.blocks.world_size
        for seq in self._mid_prefill():
            need = self.blocks.extra_blocks(seq.seq_id, self.blocks.prefill_shares(seq.remaining_prefill))
            reserved = [r + n for r, n in zip(reserved, need)]
        return reserved

    def _schedule_decode(self, step: ScheduledStep) -> None:
        for seq in list(self.running):
            # preempted for an older one this step (recomputed: waiting; swapped: still RUNNING)
            if seq.status is not SeqStatus.RUNNING or any(seq is p for p in step.preempted):
                continue
            owner = self._decode_owner(seq)
            while owner is None:
                victim = self._newest_holder()  # at newest, seq itself
                assert victim is not None
                self._preempt(victim, step)
                if victim is seq:
                    break
                owner = self._decode_owner(seq)
            if owner is None:
                continue
            add = [0] * self.blocks.world_size
            add[owner] = 1
            self.blocks.allocate(seq.seq_id, add)
            step.decode.append((seq, owner))
            seq.num_cached += 1

    def _decode_owner(self, seq: Sequence) -> int | None:
        """The rank for the sequence's next token: the balanced choice, else any rank with
        room (an uneven shard beats a preemption), else None."""
        preferred = self.blocks.decode_rank(seq.seq_id)
        for r in [preferred] + [r for r in range(self.blocks.world_size) if r != preferred]:
            add = [0] * self.blocks.world_size
            add[r] = 1
            if self.blocks.can_hold(seq.seq_id, add):
                return r
        return None

    def _newest_holder(self) -> Sequence | None:
        """The preemption victim: the latest arrival among the sequences holding KV."""
        return max(self.running + self._mid_prefill(), key=_age, default=None)

    def _preempt_for(self, seq: Sequence, shares: list[int], step: ScheduledStep) -> bool:
        """Frees room for a prompt chunk by preempting newer sequences, decoding or mid-prefill."""
        while not self.blocks.can_hold(seq.seq_id, shares):
            victim = self._newest_holder()
            if victim is None or _age(victim) <= _age(seq):
                return False
            self._preempt(victim, step)
        return True

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        """Swaps the sequence's KV out to the host (`_swap_pays`), to come back as it was, or
        drops it: it then waits to be prefilled again (prompt + tokens so far)."""
        swap = self._swap_pays(seq, step)
        (self.running if seq.status is SeqStatus.RUNNING else self.waiting).remove(seq)
        step.decode = [(s, r) for s, r in step.decode if s is not seq]
        step.prefill = [(s, a, b) for s, a, b in step.prefill if s is not seq]
        step.preempted.append(seq)
        self._passed_over_s.pop(seq.seq_id, None)  # its service is lost: all of it counts as waiting
        self.num_preemptions += 1
        if swap:
            self.blocks.swap_out(seq.seq_id)
            seq.num_preemptions += 1
            self.swapped.append(seq)
            return
        self.blocks.free(seq.seq_id)
        seq.reset_for_recompute()
        self.waiting.append(seq)

    def _swap_pays(self, seq: Sequence, step: ScheduledStep) -> bool:
        """Swap rather than recompute: in swap mode, when every rank's host pool holds the
        sequence's shard and copying it out and back is predicted to be quicker than
        prefilling its tokens again (a long context: the prefill grows faster than linearly,
        the copy linearly). A sequence already given blocks in this step (not yet computed)
        is recomputed: its shard on the ranks is not what the engine counts yet."""
        if self.config.preemption_mode != "swap" or not self.blocks.can_swap_out(seq.seq_id):
            return False
        if any(s is seq for s, _ in step.decode) or any(s is seq for s, _, _ in step.prefill):
            return False
        if self.config.swap_s_per_token is None:
            return True
        swap_s = 2 * self.config.swap_s_per_token * max(self.blocks.tokens[seq.seq_id])
        return swap_s < self.cost.prefill_s(seq.num_cached)

    def _swap_in(self, step: ScheduledStep) -> None:
        """Brings swapped-out sequences back, oldest first, while every rank has room for the
        shard beside what running and admitted sequences have spoken for (and a block for its
        own next token); the first that does not fit holds back the rest. New prompts are
        admitted beside them only when the swapped ones can still come back
        (`_swapped_can_come_back`)."""
        for seq in sorted(self.swapped, key=_age):
            if len(self.running) + self._num_mid_prefill() >= self.config.max_num_seqs:
                return
            reserve = self._reserved_blocks()
            if seq.status is SeqStatus.RUNNING:
                reserve = [r + 1 for r in reserve]
            if not self.blocks.can_hold(seq.seq_id, self.blocks.swapped[seq.seq_id], reserve):
                return
            self.blocks.swap_in(seq.seq_id)
            self.swapped.remove(seq)
            (self.running if seq.status is SeqStatus.RUNNING else self.waiting).append(seq)


def _shares_prefix(blocks: BlockManager, seq: Sequence) -> bool:
    """Whether the sequence may take a cached prefix: not when it asked for its prompt's
    logprobs, which are computed while its prompt is prefilled (as vLLM, it computes it all)."""
    return blocks.enable_prefix_caching and seq.params.prompt_logprobs is None


def _age(seq: Sequence) -> tuple[float, int]:
    """Arrival order (older first); the id breaks ties between same-time arrivals."""
    return seq.arrival_time, seq.seq_id


class StepTimeModel:
    """The step-time model the scheduler plans with, refit on the steps this engine ran, and
    how far real steps stray from it.

    The start-up calibration is a handful of timed steps of dummy sequences on a quiet engine.
    A server's steps are not those: sampling, streaming and whatever else shares the machine
    are in them, and its mixed steps carry several prompt chunks beside a decode batch, which
    the calibration never ran (a 30-layer model's served mixed steps measured 1.27x their
    calibrated prediction at the median, 1.9x at worst). So every REFIT_EVERY measured steps
    the model is refit (`CostModel.fit`: least squares in relative error, coefficients >= 0)
    on the last WINDOW steps measured, each step from one schedule() to the next on the
    scheduler's clock, plus a prior: the calibrated model's times for a dozen step shapes,
    at the window's measured speed (its median measured / calibrated), each weighing as much
    as a measured step, which keeps the fit sound in the directions the
    recent steps do not explore (a window of decode steps alone says nothing of a prompt
    chunk's cost) and moves it little in those they do.

    The fit is of steps whose shapes the scheduler itself chose (chunks sized to fill a
    budget), so on a noisy machine it can split a step's time between terms oddly; planning
    does not rely on it alone: the scale below is measured against the current model, so a
    poor fit widens the scale (smaller, safe steps) rather than breaking the TBT target.

    The noise around the refit model: the scale for a kind of step (decode, mixed, prefill
    alone) is the largest measured / predicted of its last NOISE_WINDOW steps, against the
    current model. A step planned as target / scale is no slower, relative to the model, than
    the slowest recent one, so about 1 step in NOISE_WINDOW misses a target it was planned to
    the edge of (the TBT target is a p99 one). Steps after an idle gap are not measured. With a
    clock that advances by the cost model's own prediction (a simulation), the refit model is
    the calibrated one and every scale is 1.
    """

    WINDOW = 256
    REFIT_EVERY = 16
    PRIOR_WEIGHT = 1.0  # each prior step's weight against a measured one's
    NOISE_WINDOW = 128
    LIMITS = (0.1, 10.0)

    def __init__(self, cost: CostModel) -> None:
        self.calibrated = self.model = cost
        self._steps: deque[StepSample] = deque(maxlen=self.WINDOW)  # what the fit sees
        # Per kind, its last NOISE_WINDOW steps (a rare kind keeps its own history) and their
        # measured / predicted against the current model.
        self._kind_steps: dict[str, deque[StepSample]] = {}
        self._ratios: dict[str, deque[float]] = {}
        self._since_fit = 0

    def observe(self, kind: str, sample: StepSample) -> None:
        """A measured step: its kind, (chunks [(new, cached)], decode batch, decode context,
        measured seconds)."""
        chunks, batch, context, measured_s = sample
        predicted_s = self.model.step_s(chunks, batch, context)
        if predicted_s <= 0 or measured_s < 0:
            return
        self._steps.append(sample)
        self._kind_steps.setdefault(kind, deque(maxlen=self.NOISE_WINDOW)).append(sample)
        self._ratios.setdefault(kind, deque(maxlen=self.NOISE_WINDOW)).append(measured_s / predicted_s)
        self._since_fit += 1
        if self._since_fit >= self.REFIT_EVERY:
            self.refit()

    def refit(self) -> None:
        self._since_fit = 0
        # The prior at the machine's measured speed: a uniformly slower machine is learnt as it
        # is, and the prior only holds the calibrated model's proportions. Shapes the
        # calibrated model gives no time (a model with zero decode terms) say nothing.
        calibrated = [(sample, self.calibrated.step_s(*sample[:3])) for sample in self._steps]
        speeds = [sample[3] / c for sample, c in calibrated if c > 0]
        if not speeds:
            return
        speed = float(np.median(speeds))
        prior = [(c, b, k, speed * t) for c, b, k in _PRIOR_SHAPES
                 if (t := self.calibrated.step_s(c, b, k)) > 0]
        window = list(self._steps)
        fitted = CostModel.fit(prior + window, [self.PRIOR_WEIGHT] * len(prior) + [1.0] * len(window))
        # A degenerate fit (its fixed cost gone, e.g. steps that all cost the same): keep the
        # last model. The fixed cost of a step (a pass over the weights) does not fall 100x.
        if not fitted.step_fixed_s > 0.01 * speed * self.calibrated.step_fixed_s:
            return
        self.model = fitted
        self._ratios = {}
        for kind, samples in self._kind_steps.items():
            ratios = self._ratios[kind] = deque(maxlen=self.NOISE_WINDOW)
            for chunks, batch, context, measured_s in samples:
                predicted_s = fitted.step_s(chunks, batch, context)
                if predicted_s > 0:
                    ratios.append(measured_s / predicted_s)

    def scale(self, kind: str) -> float:
        """The slowest measured / predicted of the kind's recent steps (a p99 plan)."""
        ratios = self._ratios.get(kind)
        if not ratios:
            return 1.0
        return min(max(max(ratios), self.LIMITS[0]), self.LIMITS[1])

    def typical(self, kind: str) -> float:
        """The median measured / predicted of the kind's recent steps."""
        ratios = self._ratios.get(kind)
        if not ratios:
            return 1.0
        return min(max(float(np.median(ratios)), self.LIMITS[0]), self.LIMITS[1])


# The prior's step shapes (chunks [(new, cached)], decode batch, decode context): prompt chunks
# alone over no and some cached context, two chunks in a step, decode batches short and long,
# and decode batches carrying a chunk, as the start-up calibration (LLMEngine.calibrate) runs.
_PRIOR_SHAPES: list[tuple[list[tuple[int, int]], int, int]] = [
    ([(32, 0)], 0, 0), ([(256, 0)], 0, 0), ([(2048, 0)], 0, 0), ([(256, 256)], 0, 0),
    ([(2048, 2048)], 0, 0), ([(256, 8192)], 0, 0), ([(128, 0), (128, 0)], 0, 0),
    ([], 1, 512), ([], 4, 2048), ([], 16, 8192), ([], 4, 32768),
    ([(256, 0)], 4, 2048), ([(64, 4096)], 8, 4096),
]
