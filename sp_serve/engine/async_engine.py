"""EngineClient for the HTTP frontend: the LLMEngine stepped by one thread, requests and aborts
handed in through a queue, TokenDeltas handed back to each request's asyncio queue.

The step loop never blocks on the event loop and the event loop never blocks on a step. When
idle the thread sends an empty plan about once a second, so a dead rank is noticed (and
/health turns 503) even with no traffic.

Failures: what goes wrong with one request (its sampling, its admission) fails that request
alone (RequestFailed) and the loop goes on; only a failing step (a rank or the device: the
engine marks itself dead) stops the loop and fails every open request (EngineUnavailable).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator

from sp_serve.engine.engine import LLMEngine, StepEvent
from sp_serve.engine.protocol import (
    ITERATION_TOKENS_BUCKETS,
    EngineStats,
    EngineUnavailable,
    RequestFailed,
    TokenDelta,
    TokenLogprob,
)
from sp_serve.engine.sampling import SamplingParams

log = logging.getLogger("sp_serve")
HEARTBEAT_S = 1.0


class EngineDeadError(EngineUnavailable):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stats = EngineStats()
        self._iteration_counts = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
        self._iteration_sum = 0
        # vLLM's cache_config_info labels (/metrics)
        cfg = engine.config
        self.cache_config = {
            "block_size": str(cfg.block_size), "num_gpu_blocks": str(engine.runtime.num_blocks),
            "num_cpu_blocks": str(engine.runtime.host_blocks), "cache_dtype": cfg.kv_cache_dtype,
            "preemption_mode": str(cfg.preemption_mode),
            "kv_capacity_tokens_per_rank": str(engine.runtime.num_blocks * cfg.block_size),
            "enable_prefix_caching": str(engine.enable_prefix_caching),
            "gpu_memory_utilization": str(cfg.gpu_memory_utilization),
            "sp_size": str(engine.sp_size), "tp_size": str(engine.tp_size),
            "device": engine.device_name}
        self._stop = threading.Event()
        self._draining = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sp-serve-engine", daemon=True)
        self._thread.start()

    # ---- EngineClient ----------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[TokenDelta]:
        if not self.is_healthy():
            raise EngineDeadError("the engine is not running")
        if self._draining:
            raise EngineUnavailable("the server is shutting down")
        self.engine.check_prompt(prompt_token_ids, params)  # ValueError -> HTTP 400
        if params.n != 1:
            raise ValueError("the engine takes n=1 per request; the frontend fans out n > 1")
        # a structured-output grammar compiles here, in a thread, not on the engine thread
        grammar = None
        if params.structured_outputs is not None:
            grammar = await asyncio.to_thread(self.engine.compile_grammar, params)
        loop, out = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (loop, out)
        self._inbox.put(("add", request_id, list(prompt_token_ids), params, time.monotonic(),
                         grammar))
        finished = False
        try:
            while not finished:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (client disconnect): free the KV now
                self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def is_healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self.engine.dead

    def stats(self) -> EngineStats:
        return self._stats

    def drain(self) -> None:
        """Shutting down: refuse new requests (503); those running go on."""
        self._draining = True

    def abort_all(self, message: str) -> None:
        """Ends every open request now with EngineUnavailable(message); each consumer's abort
        then frees its KV. Safe from any thread."""
        self._fail_all(EngineUnavailable(message))

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout_s)

    # ---- the step thread ---------------------------------------------------------------------
    def _run(self) -> None:
        last_plan = time.monotonic()
        try:
            while not self._stop.is_set():
                busy = self.engine.has_unfinished()
                self._drain_inbox(block=not busy)
                if self.engine.has_unfinished():
                    before = self.engine.last_step
                    self._dispatch(self.engine.step())
                    if self.engine.last_step is not before:  # a step ran (not a no-op plan)
                        self._count_iteration(self.engine.last_step)
                    last_plan = time.monotonic()
                elif time.monotonic() - last_plan >= HEARTBEAT_S:
                    self.engine.heartbeat()
                    last_plan = time.monotonic()
                self._update_stats()
        except BaseException as exc:  # a rank died or a step failed: fail every open request
            # (per-request failures never get here: LLMEngine._append and _add catch them)
            self._error = exc
            log.error("engine stopped: %s: %s", type(exc).__name__, exc)
            self._fail_all(EngineDeadError(f"the engine stopped: {type(exc).__name__}: {exc}"))
            return
        self._fail_all(EngineDeadError("the server is shutting down"))
        self.engine.shutdown()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=HEARTBEAT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item[0] == "add":
                _, rid, prompt, params, arrival, grammar = item
                if rid in self._streams:  # not aborted while queued
                    self._add(rid, prompt, params, arrival, grammar)
            elif item[0] == "abort":
                self.engine.abort_request(item[1])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, rid: str, prompt: list[int], params: SamplingParams, arrival: float,
             grammar=None) -> None:
        try:
            self.engine.add_request(rid, prompt, params, arrival, grammar)
        except ValueError as exc:
            self._send(rid, exc)
        except Exception as exc:  # this request's own state failed to build: only it fails
            log.exception("request %s failed on admission; the engine goes on", rid)
            self._send(rid, RequestFailed(f"{type(exc).__name__}: {exc}"))

    def _dispatch(self, events: list[StepEvent]) -> None:
        for ev in events:
            if ev.error is not None:
                self._send(ev.seq.request_id, RequestFailed(ev.error))
                continue
            seq, s = ev.seq, ev.sample
            logprobs = None
            if s is not None and s.logprob is not None:
                logprobs = [TokenLogprob(s.token_id, s.logprob, s.top or [])]
            queue_time, prompt_logprobs, cached = None, None, None
            if len(seq.output_token_ids) == 1:
                if seq.first_scheduled_time is not None:
                    queue_time = seq.first_scheduled_time - seq.arrival_time
                prompt_logprobs = seq.prompt_logprobs
                cached = seq.num_cached_tokens
            self._send(seq.request_id, TokenDelta([s.token_id] if s else [], logprobs,
                                                  seq.finish_reason if ev.finished else None,
                                                  queue_time, prompt_logprobs, cached))

    def _send(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, out = target
            loop.call_soon_threadsafe(out.put_nowait, item)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self._send(rid, exc)

    def _count_iteration(self, step) -> None:
        tokens = step.prefill_tokens + step.decode_batch
        bucket = next((i for i, b in enumerate(ITERATION_TOKENS_BUCKETS) if tokens <= b),
                      len(ITERATION_TOKENS_BUCKETS))
        self._iteration_counts[bucket] += 1
        self._iteration_sum += tokens

    def _update_stats(self) -> None:
        sched = self.engine.scheduler
        blocks = self.engine.blocks
        self._stats = EngineStats(len(sched.running), len(sched.waiting), blocks.usage(),
                                  sched.num_preemptions, tuple(self._iteration_counts),
                                  self._iteration_sum, blocks.prefix_cache_queries,
                                  blocks.prefix_cache_hits,
                                  kv_capacity_tokens=self.engine.kv_capacity_tokens,
                                  num_swapped=len(sched.swapped),
                                  num_swapped_out=blocks.num_swapped_out,
                                  num_swapped_in=blocks.num_swapped_in,
                                  swapped_out_blocks=blocks.swapped_out_blocks,
                                  swapped_in_blocks=blocks.swapped_in_blocks)
