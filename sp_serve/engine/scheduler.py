"""The scheduler: pure policy over Sequences and the BlockManager (no tensors, injectable clock).

Policy "slo" (default): a step is a prefill step or a decode step, never both.
  - While sequences are decoding and prompts wait, steps alternate decode / prefill, and the
    prefill step is sized by the cost model so that decode + prefill fits in the TBT target:
    every running sequence gets its next token within --tbt-slo-ms. Each chunk of a step is
    costed with its own cached context (a chunk deep into a long prompt costs more per token).
  - Waiting prompts are ordered by predicted remaining prefill time minus the prefill time that
    went to newer prompts while they waited. A short prompt arriving behind a 100K-token one
    goes first, even while the long one is being prefilled; the long one ages while newcomers
    overtake it, so it is never starved, and once aging puts it (or several) first, those take
    half of each prefill step, the short ones the other half.
  - Prompts longer than the chunk budget are prefilled in chunks; each chunk attends in place to
    the sharded KV of the earlier ones. With nothing decoding, a prefill step is still bounded
    in time (a quarter of the TTFT target): a short prompt arriving mid-step waits for that step
    and then its own, whose first tokens come only when the whole step (and any long prompt's
    chunk in it) is done, so a short prompt's TTFT stays within about half the target.
Policy "fcfs" (baseline): first come, first served; each step mixes the whole decode batch with
as much of the oldest prompts as --max-num-batched-tokens allows.

Memory: a prompt is admitted only if every rank can hold its whole prompt beside the rest of the
prompts already admitted; admission follows the policy's order, and one that does not fit holds
back the ones behind it. When a decode token or a prompt chunk finds no room, the newest
sequence holding KV (decoding or mid-prefill) is preempted: its KV is dropped, to be recomputed
later. The oldest sequence can always go on, so the scheduler never stalls.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sp_serve.engine.cost_model import CostModel
from sp_serve.engine.sequence import SeqStatus, Sequence
from sp_serve.kv.block_manager import BlockManager


@dataclass
class SchedulerConfig:
    policy: str = "slo"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    ttft_slo_s: float = 2.0
    tbt_slo_s: float = 0.2
    min_chunk_tokens: int = 32  # progress guarantee when decode alone eats the TBT budget
    # Longest predicted prefill step when nothing decodes (None: a quarter of the TTFT target).
    # A prompt arriving mid-step waits for the step and then its own: this bounds a short
    # prompt's TTFT behind a long one. Longer steps amortise the per-chunk cost better.
    max_prefill_step_s: float | None = None


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
        # Seconds of prefill a waiting sequence saw go to newer ones: its aging credit.
        self._passed_over_s: dict[int, float] = {}
        self.step_time = StepTimeCorrection()
        # (kind, predicted s, start, shape): the step in flight, measured at the next schedule()
        self._last_step: tuple[str, float, float, dict | None] | None = None
        # Called with every measured step's shape and seconds (`sp-serve serve --step-log`).
        self.step_observer: Callable[[dict], None] | None = None
        self._prefill_kind = "prefill_alone"
        # The TBT cycle in progress: (start of the last decode step, the cost model's seconds
        # for it and for the prefill step after it, None until that has been scheduled, and
        # whether that prefill step was planned to fit the TBT target).
        self._cycle: tuple[float, float, float | None, bool] | None = None
        # The prefill step being planned could not fit the TBT target: decode alone ate the
        # budget, or the progress guarantee forced a chunk (StepTimeCorrection's headroom
        # learns nothing from such a miss).
        self._prefill_forced = False

    # ---- bookkeeping -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if not self.num_unfinished:  # the engine was idle: the time since the last step is no step's
            self._last_step = self._cycle = None
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Finished or aborted: drop it and its blocks (the engine tells the ranks)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        self._passed_over_s.pop(seq.seq_id, None)

    def prefill_done(self, seq: Sequence) -> None:
        """The last chunk ran and its first token was sampled: the sequence decodes now."""
        self.waiting.remove(seq)
        self._passed_over_s.pop(seq.seq_id, None)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- policy ------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        now = self.clock()
        if self._last_step is not None:  # the engine ran the last step and came straight back
            kind, predicted_s, started, shape = self._last_step
            self.step_time.observe(kind, predicted_s, now - started)
            if self.step_observer is not None and shape is not None:
                self.step_observer({**shape, "kind": kind, "predicted_s": predicted_s,
                                    "measured_s": now - started})
        step = self._schedule()
        self._last_step = None
        kind, predicted_s = None, 0.0
        if not step.is_empty and not (step.prefill and step.decode):
            kind = self._prefill_kind if step.prefill else "decode"
            predicted_s = self._predicted_s(step)
            shape = None if self.step_observer is None else {  # only for a step log
                "chunks": [[b - a, a] for _, a, b in step.prefill],
                "decode": [len(step.decode), sum(s.num_cached for s, _ in step.decode)]}
            self._last_step = (kind, predicted_s, now, shape)
        self._track_cycle(kind, predicted_s, now)
        return step

    def _track_cycle(self, kind: str | None, predicted_s: float, now: float) -> None:
        """Measures what the TBT target is about: from one decode step to the next, across the
        prefill step between them (see StepTimeCorrection.cycle_scale)."""
        if kind == "decode":
            if self._cycle is not None and self._cycle[2] is not None:
                start, decode_s, prefill_s, planned = self._cycle
                self.step_time.observe_cycle(decode_s, prefill_s, now - start,
                                             self.config.tbt_slo_s if planned else None)
            self._cycle = (now, predicted_s, None, False)
        elif kind == "prefill_beside_decode" and self._cycle is not None and self._cycle[2] is None:
            self._cycle = (self._cycle[0], self._cycle[1], predicted_s, not self._prefill_forced)
        else:
            self._cycle = None

    def _predicted_s(self, step: ScheduledStep) -> float:
        """The cost model's time for a step (each chunk runs on its own)."""
        return (sum(self.cost.prefill_s(b - a, a) for _, a, b in step.prefill)
                + self.cost.decode_s(len(step.decode), sum(s.num_cached for s, _ in step.decode)))

    def _schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        if self.config.policy == "fcfs":
            self._schedule_decode(step)
            budget = self.config.max_num_batched_tokens - len(step.decode)
            self._schedule_prefill(step, budget, sorted(self.waiting, key=_age))
            return step
        decoding = bool(self.running)
        prefilling = bool(self.waiting)
        if decoding and (not prefilling or self._last_was_prefill):
            self._schedule_decode(step)
        if step.is_empty and prefilling:
            if self.running:  # every running sequence waits for this step: fit it in the TBT
                ctx = sum(s.num_cached for s in self.running)
                decode_s = self.cost.decode_s(len(self.running), ctx) * self.step_time.scale("decode")
                time_left_s = self.config.tbt_slo_s / self.step_time.cycle_scale() - decode_s
                self._prefill_kind = "prefill_beside_decode"  # small chunks, deep in long prompts
                self._prefill_forced = time_left_s <= 0
            else:
                time_left_s = self.config.max_prefill_step_s
                if time_left_s is None:
                    time_left_s = self.config.ttft_slo_s / 4
                self._prefill_kind = "prefill_alone"  # big chunks: the model errs differently
            # The budget in the cost model's seconds, which measured steps show run slow or fast.
            order, aged = self._by_slack()
            self._schedule_prefill(step, self.config.max_num_batched_tokens, order,
                                   time_left_s / self.step_time.scale(self._prefill_kind), aged)
            if step.is_empty and decoding:  # prompts blocked on memory: keep decoding
                self._schedule_decode(step)
        self._last_was_prefill = bool(step.prefill)
        return step

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
        scale = self.step_time.scale("prefill_alone")  # remaining time in measured seconds

        def remaining_s(s: Sequence) -> float:
            return self.cost.prefill_s(s.remaining_prefill, s.num_cached) * scale

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
        `aged` get at most half of the tokens and of the time between them."""
        admitting = True
        aged_tokens = budget // 2
        aged_s = None if time_left_s is None else time_left_s / 2
        for seq in order:
            if budget <= 0:
                break
            if seq in step.preempted:  # dropped by this very step: not back before the next
                continue
            if seq.num_cached == 0:  # not admitted yet (new, or preempted)
                if not admitting or len(self.running) + self._num_mid_prefill() >= self.config.max_num_seqs:
                    continue
                # Admit only what every rank can hold to the end of its prompt, beside the rest
                # of the prompts already admitted and a block per running sequence for its
                # decode growth. Admission goes in priority order: one that does not fit holds
                # back those behind it, so a stream of small prompts cannot starve a big one.
                shares = self.blocks.prefill_shares(seq.remaining_prefill)
                if not self.blocks.can_hold(seq.seq_id, shares, reserve_blocks=self._reserved_blocks()):
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
                # Progress guarantee: the first chunk runs even when decode alone eats the TBT.
                if not fit:
                    self._prefill_forced = True
                n = fit or min(n, self.config.min_chunk_tokens)
            shares = self.blocks.prefill_shares(n)
            if not self.blocks.can_hold(seq.seq_id, shares) and not self._preempt_for(seq, shares, step):
                continue
            self.blocks.allocate(seq.seq_id, shares)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = self.clock()
            step.prefill.append((seq, seq.num_cached, seq.num_cached + n))
            chunk_s = self.cost.prefill_s(n, seq.num_cached)
            if time_left_s is not None:
                time_left_s -= chunk_s
            if seq.seq_id in aged:
                aged_tokens -= n
                aged_s = None if aged_s is None else aged_s - chunk_s
            seq.num_cached += n
            budget -= n
        self._age_passed_over(step)

    def _age_passed_over(self, step: ScheduledStep) -> None:
        """Credits every waiting prompt with the time this step spends on newer ones: it was
        overtaken. Only newcomers jumping ahead is starvation; waiting behind an older prompt is
        first come, first served, and earns nothing (else a long prompt waiting behind another
        long one would then outrank every short prompt for as long as it had waited)."""
        scale = self.step_time.scale(self._prefill_kind)
        chunks = [(_age(s), self.cost.prefill_s(b - a, a) * scale) for s, a, b in step.prefill]
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
            if seq.status is not SeqStatus.RUNNING:  # preempted for an older one this step
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
        """Drops the sequence's KV; it waits to be prefilled again (prompt + tokens so far)."""
        (self.running if seq.status is SeqStatus.RUNNING else self.waiting).remove(seq)
        step.decode = [(s, r) for s, r in step.decode if s is not seq]
        step.prefill = [(s, a, b) for s, a, b in step.prefill if s is not seq]
        step.preempted.append(seq)
        self.blocks.free(seq.seq_id)
        self._passed_over_s.pop(seq.seq_id, None)  # its service is lost: all of it counts as waiting
        seq.reset_for_recompute()
        self.waiting.append(seq)
        self.num_preemptions += 1


def _age(seq: Sequence) -> tuple[float, int]:
    """Arrival order (older first); the id breaks ties between same-time arrivals."""
    return seq.arrival_time, seq.seq_id


class StepTimeCorrection:
    """How far the cost model is off, learnt from the steps the engine actually ran.

    The start-up calibration is a handful of timed steps; on a busy or shared machine it can be
    off by 2x either way, and every TBT-sized chunk inherits the error (too big: the TBT target
    is missed; too small: per-chunk overhead eats throughput). The scheduler's clock tells how
    long each step took, from one schedule() call to the next (sampling and output dispatch
    included, as a client sees them); the scale for a kind of step is a high quantile of
    measured/predicted over its recent steps. Steps after an idle gap are not measured. With a
    clock that advances by the cost model's own prediction (a simulation), every scale is 1.
    """

    WINDOW = 64
    MIN_SAMPLES = 8
    QUANTILE = 0.9
    CYCLE_WINDOW = 128
    CYCLE_QUANTILE = 1.0  # the TBT target is a p99 one: no cycle of the last 128 would miss
    LIMITS = (0.25, 4.0)
    # A new cycle beats the largest of the last 128 about 1 time in 129 even when the noise
    # holds still, and more often when it drifts, which leaves a p99 target on a knife's edge
    # (1-2% of a shared CPU's cycles missed it). So the headroom also answers to the target
    # itself: x1.05 after a cycle that missed it, x0.99975 after one that did not, never below
    # 1: it settles where ln(1.05) * misses = -ln(0.99975) * hits, ~0.5% of cycles missing.
    HEADROOM_UP, HEADROOM_DECAY, HEADROOM_MAX = 1.05, 0.99975, 2.0

    def __init__(self) -> None:
        self._ratios: dict[str, deque[float]] = {}
        self._cycles: deque[tuple[float, float, float]] = deque(maxlen=self.CYCLE_WINDOW)
        self.headroom = 1.0

    def observe(self, kind: str, predicted_s: float, measured_s: float) -> None:
        if predicted_s > 0 and measured_s >= 0:
            self._ratios.setdefault(kind, deque(maxlen=self.WINDOW)).append(measured_s / predicted_s)

    def scale(self, kind: str) -> float:
        return self._quantile(self._ratios.get(kind, ()), self.QUANTILE)

    def observe_cycle(self, decode_s: float, prefill_s: float, measured_s: float,
                      target_s: float | None = None) -> None:
        """A decode step and the prefill step after it: their cost-model seconds and the
        measured time from that decode step to the next one, which the TBT target (target_s)
        is about."""
        if decode_s + prefill_s > 0 and measured_s >= 0:
            # Misses before the cycle scale is measured are the calibration's, not the noise's.
            measured_before = len(self._cycles) >= self.MIN_SAMPLES
            self._cycles.append((decode_s, prefill_s, measured_s))
            if target_s is not None and measured_before:
                if measured_s > target_s:
                    self.headroom = min(self.HEADROOM_MAX, self.headroom * self.HEADROOM_UP)
                else:
                    self.headroom = max(1.0, self.headroom * self.HEADROOM_DECAY)

    def cycle_scale(self) -> float:
        """The residual the TBT budget divides by. The per-kind scales make each step's plan
        right on the whole; the whole cycle, planned with today's scales, still runs over now
        and then (noise from step to step), so the largest measured / planned of the recent
        cycles leaves the headroom for ~99% of cycles, not half, to end within the target; the
        misses against the target itself add to it (see HEADROOM_UP)."""
        d, p = self.scale("decode"), self.scale("prefill_beside_decode")
        return self.headroom * self._quantile(
            [m / (ds * d + ps * p) for ds, ps, m in self._cycles], self.CYCLE_QUANTILE)

    def _quantile(self, ratios, quantile: float) -> float:
        if len(ratios) < self.MIN_SAMPLES:
            return 1.0
        ordered = sorted(ratios)
        q = ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]
        return min(max(q, self.LIMITS[0]), self.LIMITS[1])
