"""The engine on rank 0: requests in, one step at a time, tokens out.

step(): the scheduler picks the step, the plan goes to every rank, every rank's worker runs it,
rank 0 samples from the returned logits and applies the stop rules. KV operations (frees of
finished, aborted, preempted or evicted KV, renames to cache entries, shared prefixes) ride on
the next plan, so a rank never holds a dead sequence's blocks past one step.
"""
from __future__ import annotations

import itertools
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, replace

import torch

from sp_serve.attention.backend import device_name
from sp_serve.config import EngineConfig
from sp_serve.engine.cost_model import CostModel
from sp_serve.engine.plan import DecodeToken, PrefillChunk, StepPlan
from sp_serve.engine.protocol import TokenLogprob
from sp_serve.engine.runtime import (
    RankRuntime,
    build_runtime,
    copy_bandwidth,
    kv_bytes_per_token,
    worker_rank_main,
)
from sp_serve.engine.sampling import (
    SampleResult,
    SamplingParams,
    TokenCounts,
    greedy_tokens,
    make_generator,
    plain_greedy,
    sample,
)
from sp_serve.engine.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from sp_serve.engine.sequence import SeqStatus, Sequence
from sp_serve.engine.structured import GrammarMasks
from sp_serve.kv.block_manager import BlockManager
from sp_serve.model.loader import load_tokenizer
from sp_serve.model.overrides import stretch_hint
from sp_serve.model.source import checkpoint_dir
from sp_serve.model.llama import TensorParallel
from sp_serve.model.spec import load_spec
from sp_serve.parallel.groups import abort_parallel, shutdown_parallel
from sp_serve.parallel.launch import (
    launched_by_torchrun,
    spawn_ranks,
    torchrun_rank,
    wait_for_ranks,
)

log = logging.getLogger("sp_serve")


@dataclass
class StepEvent:
    seq: Sequence
    sample: SampleResult | None  # the token produced this step (None: finished without one)
    finished: bool
    error: str | None = None  # this sequence alone failed (finish_reason "error"); it is freed


@dataclass
class StepTiming:
    kind: str  # "prefill" | "decode" | "mixed"
    seconds: float
    prefill_tokens: int
    cached_tokens: int
    decode_batch: int
    decode_context: int


class LLMEngine:
    def __init__(self, config: EngineConfig):
        # a GGUF file becomes its converted checkpoint (once); ranks get the directory
        config = replace(config, model=str(checkpoint_dir(config.model)))
        self.config = config
        self.spec = load_spec(config.model, config.hf_overrides)  # fails fast, before any rank starts
        TensorParallel(0, config.tp_size).check(self.spec)
        self.enable_prefix_caching = prefix_caching_enabled(config, self.spec)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model, required=bool(config.tokenizer))
        limit = self.spec.max_model_len  # max_position_embeddings, extended by RoPE scaling
        if config.max_model_len is not None and config.max_model_len > limit:
            hint = stretch_hint(self.spec.trained_len, config.max_model_len)
            raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's context "
                             f"({limit} tokens); use at most {limit}, or stretch the context with "
                             f"RoPE scaling, e.g. {hint}")
        self.max_model_len = config.max_model_len or limit
        self._step_log = None
        # Rank 0 only, and before any rank starts: a bad path is a plain user error.
        if config.step_log and not (launched_by_torchrun() and torchrun_rank()[0] != 0):
            try:
                self._step_log = open(config.step_log, "a", encoding="utf-8", buffering=1)
            except OSError as exc:
                raise ValueError(f"--step-log {config.step_log!r}: cannot write it ({exc.strerror}); "
                                 "give a path in a writable directory") from exc
        self._procs = []
        if launched_by_torchrun():
            rank, world, local_rank = torchrun_rank()
            if world != config.world_size:
                raise ValueError(
                    f"torchrun started {world} rank(s) but --tensor-parallel-size "
                    f"{config.tp_size} x --sp-size {config.sp_size} = {config.world_size}; make "
                    "nnodes x nproc-per-node equal tp x sp (or change --sp-size)")
            if rank != 0:  # every other rank serves plans until rank 0 says stop, then leaves
                # torchrun sends SIGTERM (and a terminal SIGINT) to every rank at once; rank 0
                # alone stops the work (drain, then a shutdown plan), as with spawned ranks. A
                # rank whose rank 0 died still leaves at its next collective; torchrun follows
                # an unanswered SIGTERM with SIGKILL.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                worker_rank_main(rank, world, None, config, local_rank)
                raise SystemExit(0)
            self.runtime: RankRuntime = build_runtime(config, 0, world, None, local_rank)
        else:
            store, self._procs = spawn_ranks(config.world_size, worker_rank_main, (config,),
                                             config.dist_timeout_s)
            self.runtime = build_runtime(
                config, 0, config.world_size, store,
                before_join=lambda: wait_for_ranks(store, self._procs, config.dist_timeout_s))
        self.world_size = self.runtime.pc.world_size  # tp_size x sp_size ranks
        self.sp_size, self.tp_size = self.runtime.pc.sp_size, self.runtime.pc.tp_size
        self._stopping = threading.Event()
        if self._procs and self.runtime.pc.device.type == "cuda":
            threading.Thread(target=self._watch_ranks, daemon=True,
                             name="sp-serve-rank-watch").start()
        self.attn_backend = self.runtime.worker.backend
        self.device_name = device_name(self.runtime.pc.device)
        self.blocks = BlockManager(self.sp_size, self.runtime.num_blocks, config.block_size,
                                   self.enable_prefix_caching, self.runtime.host_blocks)
        cost = CostModel.load(config.cost_model_path) if config.cost_model_path else CostModel()
        # A swap is priced by this machine's device -> host copy rate (out and back in), a
        # recompute by the cost model: only a calibrated one (slo, or a saved one) can tell.
        self.swap_bandwidth = None
        swap_s_per_token = None
        if self.runtime.host_blocks:
            self.swap_bandwidth = copy_bandwidth(self.runtime.pc.device)
            if config.scheduler == "slo" or config.cost_model_path:
                swap_s_per_token = self.kv_bytes_per_token / self.swap_bandwidth
        self.scheduler = Scheduler(
            SchedulerConfig(config.scheduler, config.max_num_seqs, config.max_num_batched_tokens,
                            config.ttft_slo_ms / 1e3, config.tbt_slo_ms / 1e3,
                            preemption_mode=config.preemption_mode,
                            swap_s_per_token=swap_s_per_token),
            self.blocks, cost)
        self._seq_ids = itertools.count()
        self._by_request: dict[str, list[Sequence]] = {}
        self._generators: dict[int, torch.Generator | None] = {}
        self._token_counts: dict[int, TokenCounts] = {}  # sequences with penalties only
        self._grammars = GrammarMasks(self.tokenizer, self.spec.vocab_size,
                                      list(self.spec.eos_token_ids))  # structured outputs
        self.last_step: StepTiming | None = None
        self.dead = False
        if config.scheduler == "slo" and not config.cost_model_path:
            self.scheduler.cost = self.calibrate()
        if self._step_log is not None:
            self.scheduler.step_observer = self._log_step
        log.info("sp-serve engine: %d rank(s) (tp_size %d x sp_size %d) on %s, attention backend "
                 "%s, %d KV blocks of %d tokens per rank, scheduler %s, prefix caching %s",
                 self.world_size, self.tp_size, self.sp_size, self.device_name, self.attn_backend,
                 self.runtime.num_blocks, config.block_size, config.scheduler,
                 "on" if self.enable_prefix_caching else "off")
        log.info("weights: %.1f MiB per rank (rank 0's share at tp_size %d)",
                 self.runtime.weight_bytes / 2**20, self.tp_size)
        log.info("KV cache: %s, %d bytes per token per rank, capacity %d tokens per SP rank (%d "
                 "over %d SP rank(s))", self.kv_cache_dtype_name, self.kv_bytes_per_token,
                 self.kv_capacity_tokens // self.sp_size, self.kv_capacity_tokens, self.sp_size)
        if self.runtime.host_blocks:
            log.info("KV host pool (swap): %d blocks = %d tokens per rank, preemption by %s, "
                     "device -> host copy %.2f GB/s", self.runtime.host_blocks,
                     self.runtime.host_blocks * config.block_size, config.preemption_mode,
                     self.swap_bandwidth / 1e9)

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV pools of all ranks hold together."""
        return self.runtime.num_blocks * self.config.block_size * self.sp_size

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's K and V take in the rank that stores it (scales included)."""
        kv = self.runtime.worker.kv  # this rank's KV heads (its share with TP)
        return kv_bytes_per_token(self.runtime.worker.spec, kv.dtype, self.config.kv_cache_dtype)

    @property
    def kv_cache_dtype_name(self) -> str:
        kv = self.runtime.worker.kv
        if kv.fmt is None:
            return f"auto ({str(kv.dtype).removeprefix('torch.')})"
        return f"{kv.fmt.name} + a bfloat16 scale per token and KV head"

    # ---- requests ------------------------------------------------------------------------
    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """ValueError for a request this engine cannot serve (worded as vLLM words it)."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; send at least one token")
        bad = [t for t in prompt_token_ids if not (0 <= t < self.spec.vocab_size)]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of vocabulary (size {self.spec.vocab_size})")
        bad = [t for t in (params.logit_bias or {}) if t >= self.spec.vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is out of vocabulary (size "
                             f"{self.spec.vocab_size})")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} "
                "in the completion). Please reduce the length of the prompt or completion.")
        need = self.blocks.prefill_shares(n + params.max_tokens)
        per_rank_blocks = max(-(-t // self.config.block_size) for t in need)
        if per_rank_blocks > self.runtime.num_blocks:
            raise ValueError(f"the request needs {per_rank_blocks} KV blocks per rank but each rank has "
                             f"{self.runtime.num_blocks}; raise --kv-cache-memory or --sp-size")

    def compile_grammar(self, params: SamplingParams):
        """The request's structured-output matcher (None without one), for add_request; safe
        from any thread, so a server compiles it off the engine thread. ValueError if invalid."""
        if params.structured_outputs is None:
            return None
        return self._grammars.compile(params.structured_outputs)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, grammar=None) -> list[Sequence]:
        self.check_prompt(prompt_token_ids, params)
        if request_id in self._by_request:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.monotonic() if arrival_time is None else arrival_time
        seqs = []
        for i in range(params.n):
            p = params if params.n == 1 else _one_of_n(params, i)
            seq = Sequence(next(self._seq_ids), request_id, list(prompt_token_ids), p, now)
            self._generators[seq.seq_id] = make_generator(p, self.runtime.pc.device)
            if p.has_penalties:
                self._token_counts[seq.seq_id] = TokenCounts(prompt_token_ids, self.spec.vocab_size,
                                                             self.runtime.pc.device)
            seqs.append(seq)
        for seq in seqs:
            if seq.params.structured_outputs is not None:
                try:
                    self._grammars.add(seq.seq_id, seq.params.structured_outputs, grammar)
                except Exception:
                    for s in seqs:
                        self._grammars.remove(s.seq_id)
                        self._generators.pop(s.seq_id, None)
                        self._token_counts.pop(s.seq_id, None)
                    raise
        for seq in seqs:  # only once all were built: a failure above leaves nothing scheduled
            self.scheduler.add(seq)
        self._by_request[request_id] = seqs
        return seqs

    def abort_request(self, request_id: str) -> None:
        for seq in list(self._by_request.get(request_id, [])):
            self.finish_sequence(seq, "abort")

    def finish_sequence(self, seq: Sequence, reason: str) -> None:
        """Ends one sequence now (abort, or a stop string the frontend found) and frees its KV."""
        if seq.status is not SeqStatus.FINISHED:
            seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
            self._release(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def _release(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)  # its KV is freed, or kept as a cache entry, on the next plan
        self._generators.pop(seq.seq_id, None)
        self._token_counts.pop(seq.seq_id, None)
        self._grammars.remove(seq.seq_id)
        siblings = self._by_request.get(seq.request_id, [])
        if all(s.status is SeqStatus.FINISHED for s in siblings):
            self._by_request.pop(seq.request_id, None)

    # ---- stepping ------------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        sched = self.scheduler.schedule()
        plan = self._plan(sched)
        if plan.is_noop:
            return []
        # the grammar masks of the tokens this step samples are computed during its forward pass
        self._grammars.start([s.seq_id for s, _, end in sched.prefill if end == s.prefill_target]
                             + [s.seq_id for s, _ in sched.decode])
        t0 = time.perf_counter()
        logits = self._run(plan)
        self._sync_device()
        self.last_step = _timing(sched, time.perf_counter() - t0)
        now = time.monotonic()
        events = []
        for seq, start, _ in sched.prefill:
            rows = self.runtime.worker.prompt_logprobs.get(seq.seq_id)
            if rows is not None:
                self._store_prompt_logprobs(seq, start, rows)
        sampled = [seq for seq, _, end in sched.prefill if end == seq.prefill_target]
        for seq in sampled:
            self.scheduler.prefill_done(seq)
        sampled += [seq for seq, _ in sched.decode]
        greedy = [seq for seq in sampled if plain_greedy(seq.params)]
        tokens = dict(zip([s.seq_id for s in greedy],
                          greedy_tokens([logits[s.seq_id] for s in greedy]) if greedy else []))
        for seq in sampled:
            events.append(self._append(seq, logits[seq.seq_id], now, tokens.get(seq.seq_id)))
        return events

    def _store_prompt_logprobs(self, seq: Sequence, start: int, rows: torch.Tensor) -> None:
        """Rows of one prefilled chunk (row i scores prompt position start + i + 1), kept by
        position: a chunk prefilled again after a preemption overwrites its entries."""
        prompt = seq.prompt_token_ids
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None] * len(prompt)
        k = seq.params.prompt_logprobs
        for i, row in enumerate(rows[:max(0, len(prompt) - 1 - start)].tolist()):
            top = list(zip((int(t) for t in row[2 + k:2 + 2 * k]), row[2:2 + k]))
            seq.prompt_logprobs[start + i + 1] = TokenLogprob(prompt[start + i + 1], row[0], top,
                                                              int(row[1]))

    def heartbeat(self) -> None:
        """Sends pending frees (or an empty plan) so idle ranks see rank 0 alive."""
        self._run(self._plan(ScheduledStep()))

    def _plan(self, sched: ScheduledStep) -> StepPlan:
        return StepPlan(
            prefill=[PrefillChunk(s.seq_id, s.prefill_tokens(a, b), a, b == s.prefill_target,
                                  s.prefill_target, *self._prompt_logprobs_of(s, b))
                     for s, a, b in sched.prefill],
            decode=[DecodeToken(s.seq_id, s.all_token_ids[-1], s.num_tokens - 1, owner)
                    for s, owner in sched.decode],
            kv_ops=self.blocks.take_ops())  # frees (finished, preempted, evicted), shares

    def _watch_ranks(self, interval_s: float = 0.5) -> None:
        while not self._stopping.wait(interval_s):
            if self._check_ranks():
                return

    def _check_ranks(self) -> bool:
        """On CUDA, a spawned rank that exits (crash, out of memory, killed) leaves its peers
        blocked in an NCCL collective that only the NCCL timeout would end: abort the
        communicators at once, so rank 0's collective fails, the engine is marked dead (/health
        503, `sp-serve serve` exits 1) and nothing is left to the watchdog. True once done.
        (Gloo, on CPU, notices a closed socket by itself.)"""
        gone = [f"rank {i} exited with code {p.exitcode}" for i, p in enumerate(self._procs, 1)
                if p.exitcode is not None]
        if not gone or self._stopping.is_set():
            return False
        log.error("%s: aborting the NCCL communicators", "; ".join(gone))
        self.dead = True
        abort_parallel()
        return True

    def _sync_device(self) -> None:
        """On CUDA, waits for the step's kernels: a step is timed (StepTiming, --step-log, the
        scheduler's clock, calibration) by when its work is done, not when it was queued. A
        step whose logits are sampled waits there anyway; a prefill chunk that samples nothing
        would otherwise look nearly free and its time land on the next step. A no-op on CPU."""
        dev = self.runtime.pc.device
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def _prompt_logprobs_of(self, seq: Sequence, end: int) -> tuple[int | None, int | None]:
        """(k, the token after the chunk) for a chunk of a prompt whose logprobs were asked for
        and not yet computed (a recompute after preemption does not score them again)."""
        k = seq.params.prompt_logprobs
        if k is None or seq.output_token_ids:
            return None, None
        prompt = seq.prompt_token_ids
        return min(k, self.spec.vocab_size), prompt[end] if end < len(prompt) else None

    def _run(self, plan: StepPlan) -> dict[int, torch.Tensor]:
        try:
            self.runtime.send_plan(plan)
            return self.runtime.worker.execute(plan)
        except Exception as exc:
            self.dead = True
            time.sleep(0.2)  # let a crashed rank's exit code settle
            gone = [f"rank {i} exited with code {p.exitcode}" for i, p in enumerate(self._procs, 1)
                    if p.exitcode is not None]
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RuntimeError(f"a rank stopped ({'; '.join(gone) or 'peer lost'}): {first_line}") from exc

    def _append(self, seq: Sequence, logits_v: torch.Tensor, now: float,
                token: int | None = None) -> StepEvent:
        """Samples one sequence's token (`token`: already sampled, greedy_tokens) and applies its
        stop rules. A failure here is this sequence's alone: it finishes with reason "error" (its
        KV freed by the next plan) and the step goes on for the others. A failing device shows
        in the next step's _run instead."""
        try:
            counts = self._token_counts.get(seq.seq_id)
            result = SampleResult(token) if token is not None else sample(
                logits_v, seq.params, self._generators.get(seq.seq_id), counts,
                self._banned(seq), self._grammars.take(seq.seq_id))
            if counts is not None:
                counts.add(result.token_id)
            grammar_done = (seq.seq_id in self._grammars
                            and self._grammars.advance(seq.seq_id, result.token_id))
            seq.output_token_ids.append(result.token_id)
            seq.last_token_time = now
            reason = self._finish_reason(seq, result.token_id) or ("stop" if grammar_done else None)
        except Exception as exc:
            log.exception("request %s failed in sampling; the engine goes on", seq.request_id)
            self.finish_sequence(seq, "error")
            return StepEvent(seq, None, True, error=f"{type(exc).__name__}: {exc}")
        if reason is not None:
            seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
            self._release(seq)
        return StepEvent(seq, result, reason is not None)

    def _banned(self, seq: Sequence) -> list[int] | None:
        """vLLM's min_tokens: the tokens that would stop the sequence, while it is too short."""
        p = seq.params
        if len(seq.output_token_ids) >= p.min_tokens:
            return None
        stops = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.spec.eos_token_ids))
        return [t for t in stops if t < self.spec.vocab_size] or None

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if len(seq.output_token_ids) >= p.min_tokens:
            if not p.ignore_eos and token in self.spec.eos_token_ids:
                return "stop"
            if token in p.stop_token_ids:
                return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # ---- start-up profile ----------------------------------------------------------------
    def calibrate(self) -> CostModel:
        """Times steps of dummy sequences and fits the cost model: prompt chunks alone (three
        sizes, each first over an empty cache, then over as many cached tokens; then the
        smallest after twice the largest, as late in a long prompt), decode batches
        alone (1, 2, 4 and 8 short sequences: the per-sequence cost; the long ones: the
        per-context-token cost; median of 3 each), and decode batches carrying a chunk, then
        two (the steps the slo policy runs while sequences decode). The scheduler refits it
        on the steps it runs (scheduler.StepTimeModel)."""
        # The chunk sizes the scheduler will run. On CPU at most 2048 (a profile step of a
        # bigger chunk takes seconds there); a GPU runs the largest chunk in milliseconds, and
        # its cost per token changes with size (tiles fill up), so it is profiled as it is.
        limit = 2048 if self.runtime.pc.device.type == "cpu" else self.config.max_num_batched_tokens
        cap = max(16, min(self.config.max_num_batched_tokens, self.max_model_len // 4, limit))
        sizes = sorted({max(8, cap // 8), max(8, cap // 2), cap})
        ctx: dict[int, int] = {}  # profile sequence -> tokens cached
        # Warm-up: one-off allocator and pool costs.
        if self._profile_step([(-1, 0, sizes[0])], [], ctx):
            self._profile_step([], [-1], ctx)
        samples: list = []
        for i, n in enumerate(sizes):
            for start in (0, n):  # a first chunk, then a chunk over n cached tokens
                self._profile_step([(-2 - i, start, start + n)], [], ctx, samples)
        if -2 - (len(sizes) - 1) in ctx:  # a small chunk deep in a long prompt: attention-bound
            sid = -2 - (len(sizes) - 1)
            self._profile_step([(sid, ctx[sid], ctx[sid] + sizes[0])], [], ctx, samples)
        long_ids = [sid for sid in ctx if sid != -1]
        short = min(64, self.max_model_len // 4)
        for sid in range(-10, -18, -1):
            self._profile_step([(sid, 0, short)], [], ctx)
        shorts = [sid for sid in range(-10, -18, -1) if sid in ctx]
        batches = [shorts[:b] for b in (1, 2, 4, 8)] + [[sid] for sid in long_ids] + [long_ids]
        for batch in batches:
            if batch:
                times: list = []
                for _ in range(3):
                    self._profile_step([], batch, ctx, times)
                if times:
                    samples.append(sorted(times, key=lambda t: t[3])[len(times) // 2])
        for i, n in enumerate(sizes[:2]):
            self._profile_step([(-20 - i, 0, n)], shorts[:4], ctx, samples)
        if -20 in ctx:  # as a served mixed step: two prompts' chunks, one over cached context
            self._profile_step([(-20, ctx[-20], ctx[-20] + sizes[0]), (-22, 0, sizes[0])],
                               shorts[:4], ctx, samples)
        self._release_profile(list(ctx))
        if sum(1 for chunks, *_ in samples if chunks) < 3 or sum(1 for c, b, *_ in samples if b and not c) < 3:
            log.warning("KV pool too small for the start-up profile; using default step costs")
            return CostModel()
        cost = CostModel.fit(samples)
        log.info("cost model: %s", cost)
        return cost

    def _profile_step(self, chunks: list[tuple[int, int, int]], decode: list[int],
                      ctx: dict[int, int], out: list | None = None) -> bool:
        """Runs one step of profile sequences: chunks (seq, start, end) and a decode token for
        each sequence in `decode`; appends (chunks [(new, cached)], batch, context, seconds) to
        out. False (nothing run) when the pool cannot hold it."""
        tokens = []
        for sid, start, end in chunks:
            shares = self.blocks.prefill_shares(end - start)
            if not self.blocks.can_hold(sid, shares):
                return False
            self.blocks.allocate(sid, shares)
        for sid in decode:
            owner = self.blocks.decode_rank(sid)
            add = [int(r == owner) for r in range(self.sp_size)]
            if not self.blocks.can_hold(sid, add):
                return False
            self.blocks.allocate(sid, add)
            tokens.append(DecodeToken(sid, 0, ctx[sid], owner))
        plan = StepPlan(prefill=[PrefillChunk(sid, [0] * (end - start), start, True, end)
                                 for sid, start, end in chunks], decode=tokens)
        t0 = time.perf_counter()
        self._run(plan)
        self._sync_device()
        seconds = time.perf_counter() - t0
        for sid, _, end in chunks:
            ctx[sid] = end
        for sid in decode:
            ctx[sid] += 1
        if out is not None:
            out.append(([(end - start, start) for _, start, end in chunks], len(decode),
                        sum(ctx[sid] for sid in decode), seconds))
        return True

    def _release_profile(self, ids: list[int]) -> None:
        for sid in ids:
            self.blocks.free(sid)
        self._run(StepPlan(kv_ops=self.blocks.take_ops()))

    def _log_step(self, record: dict) -> None:
        """--step-log: one JSON line per measured step. A failing write (disk full) stops the
        log with a warning; it never fails a step."""
        try:
            self._step_log.write(json.dumps(record) + "\n")
        except (OSError, ValueError) as exc:
            log.warning("--step-log: stopped writing (%s)", exc)
            self.scheduler.step_observer = None

    def shutdown(self) -> None:
        if getattr(self, "_grammars", None) is not None:
            self._grammars.close()
        if getattr(self, "_step_log", None) is not None:
            self._step_log.close()
            self._step_log = None
        if getattr(self, "runtime", None) is None:
            return
        if getattr(self, "_stopping", None) is not None:
            self._stopping.set()
        try:
            if not self.dead:
                self.runtime.send_plan(StepPlan(shutdown=True))
        except Exception:
            pass
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        shutdown_parallel(self.runtime.pc, aborted=self.dead)
        self.runtime = None


def prefix_caching_enabled(config: EngineConfig, spec) -> bool:
    """--enable-prefix-caching: on unless refused. Dynamic-NTK RoPE rotates a prompt's keys by
    the whole prompt's length, so a cached prefix is only right for prompts of the same length:
    off by default there, an error when asked for."""
    if spec.rope_type == "dynamic":
        if config.enable_prefix_caching:
            raise ValueError("--enable-prefix-caching cannot be used with dynamic-NTK RoPE (a "
                             "prompt's keys depend on its whole length, so no prefix is shared); "
                             "drop the flag or use --no-enable-prefix-caching")
        return False
    return config.enable_prefix_caching is not False


def _one_of_n(params: SamplingParams, i: int) -> SamplingParams:
    # the prompt's logprobs are the same for every sample: the first one computes them
    return replace(params, n=1, seed=None if params.seed is None else params.seed + i,
                   prompt_logprobs=params.prompt_logprobs if i == 0 else None)


def _timing(sched: ScheduledStep, seconds: float) -> StepTiming:
    kind = "mixed" if sched.prefill and sched.decode else ("prefill" if sched.prefill else "decode")
    return StepTiming(kind, seconds,
                      sum(b - a for _, a, b in sched.prefill), sum(a for _, a, _ in sched.prefill),
                      len(sched.decode), sum(s.num_cached for s, _ in sched.decode))
