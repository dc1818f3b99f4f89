"""Each rank's runtime: the model, its KV pool and worker, and the control-plane loop.

Rank 0 broadcasts a StepPlan on the gloo control group every step (and an empty one about once
a second when idle, so a dead peer is noticed); every other rank loops receiving and executing.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sp_serve.attention.backend import resolve_backend
from sp_serve.config import EngineConfig
from sp_serve.engine.plan import StepPlan
from sp_serve.engine.worker import Worker
from sp_serve.kv import quant
from sp_serve.kv.cache import PagedKVCache
from sp_serve.model.llama import TensorParallel
from sp_serve.model.loader import load_model
from sp_serve.parallel.groups import ParallelContext, init_parallel, pick_device, shutdown_parallel
from sp_serve.parallel.launch import announce_joined, client_store

log = logging.getLogger("sp_serve")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_BYTES = 4 * 2**30  # per rank; CPU pages are committed only when written


@dataclass
class RankRuntime:
    pc: ParallelContext
    worker: Worker
    num_blocks: int
    host_blocks: int = 0  # host KV pool per rank (swap to host)
    weight_bytes: int = 0  # this rank's share of the weights

    def send_plan(self, plan: StepPlan) -> None:
        """Rank 0: hand the plan to every other rank (a no-op at world size 1)."""
        if self.pc.world_size > 1:
            dist.broadcast_object_list([plan], src=0, group=self.pc.control_group)

    def recv_plan(self) -> StepPlan:
        box: list = [None]
        dist.broadcast_object_list(box, src=0, group=self.pc.control_group)
        return box[0]


def set_cpu_threads(config: EngineConfig, world_size: int) -> None:
    threads = config.cpu_threads or max(1, (os.cpu_count() or 1) // world_size)
    torch.set_num_threads(threads)


def kv_bytes_per_token(spec, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes a token's K and V take in a rank's pool (a quantized cache's scales included)."""
    return quant.kv_bytes_per_token(spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype,
                                    kv_cache_dtype)


def copy_bandwidth(device: torch.device, nbytes: int = 64 << 20) -> float:
    """Bytes per second of a device -> host copy of `nbytes` (a swap-out; pinned on CUDA),
    best of three: what the scheduler's swap-or-recompute choice prices a swap with."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / max(best, 1e-9)


@torch.inference_mode()
def profile_peak_bytes(model, spec, num_tokens: int, num_logits: int, backend: str,
                       device: torch.device) -> int:
    """Runs one forward pass of `num_tokens` dummy tokens (causal attention over themselves, as
    the largest step's local share would) plus logits for `num_logits` rows, and returns the
    peak memory it took above what was allocated before (CUDA's allocator statistics; 0 on
    CPU, where nothing is reserved ahead)."""
    from sp_serve.attention.local import attention_with_lse
    scale = spec.softmax_scale
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    pos = torch.arange(num_tokens, device=device)

    def attn(layer, q_thd, k_thd, v_thd):
        return attention_with_lse(q_thd, k_thd, v_thd, True, scale, backend)[0]

    hidden = model(ids, pos, attn)
    model.compute_logits(hidden[:num_logits])
    del hidden
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return max(0, peak)


def cuda_kv_budget(config: EngineConfig, model, spec, pc: ParallelContext, backend: str) -> int:
    """Bytes for the KV pool on a GPU, as vLLM sizes it: what --gpu-memory-utilization allows
    of the device, less the weights, less the peak of a profiling forward at the largest step
    this rank may run (its share of a --max-num-batched-tokens chunk plus a full decode batch,
    and rank 0's logits for them), less what lives outside torch's allocator (CUDA context,
    NCCL buffers). No fixed reserve: a small model on a big GPU gets its memory, and a long
    chunk of a big model is accounted for."""
    dev = pc.device
    tokens = -(-config.max_num_batched_tokens // pc.sp_size) + config.max_num_seqs
    peak = profile_peak_bytes(model, spec, tokens, config.max_num_seqs, backend, dev)
    free, total = torch.cuda.mem_get_info(dev)
    weights = torch.cuda.memory_allocated(dev)  # the model (the profile's memory is freed)
    outside_torch = max(0, (total - free) - torch.cuda.memory_reserved(dev))
    budget = int(total * config.gpu_memory_utilization) - weights - peak - outside_torch
    log.info("KV budget: %.2f GiB = %.0f%% of %.2f GiB - weights %.2f - profiled step peak %.2f "
             "- outside torch %.2f (%d tokens profiled)", budget / 2**30,
             100 * config.gpu_memory_utilization, total / 2**30, weights / 2**30, peak / 2**30,
             outside_torch / 2**30, tokens)
    return budget


def _num_blocks(config: EngineConfig, spec, dtype: torch.dtype, pc: ParallelContext,
                model=None, backend: str = "torch") -> int:
    per_block = kv_bytes_per_token(spec, dtype, config.kv_cache_dtype) * config.block_size
    if config.kv_cache_memory is not None:
        budget = config.kv_cache_memory
    elif pc.device.type == "cuda":
        budget = cuda_kv_budget(config, model, spec, pc, backend)
    else:
        budget = DEFAULT_CPU_KV_BYTES
    blocks = torch.tensor([max(0, budget // per_block)], dtype=torch.long)
    if pc.world_size > 1:  # every rank must have the same pool size: take the smallest
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=pc.control_group)
    if blocks.item() < 1:
        raise ValueError(f"no room for a single KV block ({per_block} bytes) per rank; "
                         "raise --kv-cache-memory or --gpu-memory-utilization, or lower "
                         "--max-num-batched-tokens (the profiled step's activations)")
    return int(blocks.item())


def build_runtime(config: EngineConfig, rank: int, world_size: int, store: dist.Store | None,
                  local_rank: int | None = None, before_join=None) -> RankRuntime:
    """Loads the model, then (after before_join(), e.g. waiting for the other ranks) joins the
    process groups. Loading first means a bad checkpoint fails before any rank waits on it."""
    set_cpu_threads(config, world_size)
    device = pick_device(config.device, rank if local_rank is None else local_rank)
    dtype = None if config.dtype == "auto" else _DTYPES[config.dtype]
    tp = TensorParallel(rank % config.tp_size, config.tp_size)  # its comm once the groups exist
    model, _ = load_model(config.model, dtype=dtype, device=device,
                          hf_overrides=config.hf_overrides, tp=tp)
    if before_join is not None:
        before_join()
    pc = init_parallel(rank, world_size, store, device, config.dist_timeout_s, config.cpu_comm,
                       config.tp_size)
    tp.comm = pc.tp_comm
    spec = model.local_spec  # this rank's heads: its KV pool holds only its KV heads
    weight_bytes = model.weight_bytes()
    log.info("rank %d (tp %d/%d, sp %d/%d): weights %.1f MiB", rank, pc.tp_rank, pc.tp_size,
             pc.sp_rank, pc.sp_size, weight_bytes / 2**20)
    kv_dtype = next(model.parameters()).dtype
    backend = resolve_backend(config.attn_backend, pc.device)
    num_blocks = _num_blocks(config, spec, kv_dtype, pc, model, backend)
    per_block = kv_bytes_per_token(spec, kv_dtype, config.kv_cache_dtype) * config.block_size
    host_blocks = config.kv_offloading_size // per_block  # the same on every rank
    kv = PagedKVCache(spec.num_layers, num_blocks, config.block_size, spec.num_kv_heads,
                      spec.head_dim, kv_dtype, pc.device, config.kv_cache_dtype, host_blocks)
    worker = Worker(pc, model, spec, kv, backend)
    if worker.uses_triton:  # compile every kernel variant now, not mid-serving on one rank
        t0 = time.perf_counter()
        launches = worker.warm_up(config.max_num_seqs)
        log.info("Triton kernels warmed up: %d launches in %.1f s", launches,
                 time.perf_counter() - t0)
    return RankRuntime(pc, worker, num_blocks, host_blocks, weight_bytes)


def worker_rank_main(rank: int, world_size: int, store_port: int | None, config: EngineConfig,
                     local_rank: int | None = None) -> None:
    """Entry of every rank but 0: execute plans until told to stop; exit non-zero on failure.

    store_port: rank 0's rendezvous store (spawned ranks); None under torchrun (env://)."""
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(message)s")
    try:
        store = None if store_port is None else client_store(store_port, config.dist_timeout_s)
        ready = None if store is None else (lambda: announce_joined(store, rank))
        rt = build_runtime(config, rank, world_size, store, local_rank, before_join=ready)
        while True:
            plan = rt.recv_plan()
            if plan.shutdown:
                break
            rt.worker.execute(plan)
    except Exception as exc:  # a peer died or a step failed: say so in one line and leave
        print(f"sp-serve rank {rank}: stopping: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr, flush=True)
        os._exit(1)
    shutdown_parallel(rt.pc)
    time.sleep(0)  # let logging flush
