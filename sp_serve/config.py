"""Engine configuration in one place; flags keep vLLM's spellings. ValueError on bad input."""
from __future__ import annotations

import re
from dataclasses import dataclass

from sp_serve.kv.quant import KV_CACHE_DTYPES


@dataclass
class EngineConfig:
    model: str
    sp_size: int = 1
    tp_size: int = 1  # tensor parallel ranks per SP rank (consecutive ranks); world = tp x sp
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (the checkpoint's) | float32 | bfloat16 | float16
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192  # prefill tokens per step (a longer prompt is chunked)
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes per rank for the KV pool
    gpu_memory_utilization: float = 0.9
    scheduler: str = "slo"  # slo | fcfs
    ttft_slo_ms: float = 2000.0
    tbt_slo_ms: float = 200.0
    attn_backend: str = "auto"  # auto | torch | triton | flash-attn
    dist_timeout_s: float = 120.0
    seed: int = 0
    cost_model_path: str | None = None  # a saved calibration (skips the start-up profile run)
    step_log: str | None = None  # JSONL of every measured step, for `plan --simulate --step-log`
    cpu_threads: int | None = None  # torch threads per rank on CPU (default: cores // ranks)
    cpu_comm: str = "auto"  # CPU tensor collectives: auto (shared memory on one host) | shm | gloo
    tokenizer: str | None = None  # a tokenizer directory or .gguf file (default: the model's)
    hf_overrides: dict | None = None  # merged into config.json (model/overrides.py)
    # Keep finished sequences' KV and share common prompt prefixes. None: on, unless the model
    # cannot share prefixes (dynamic-NTK RoPE); True: on (an error where it cannot be).
    enable_prefix_caching: bool | None = None
    # KV storage: auto (the model's dtype) | fp8 (= fp8_e4m3) | fp8_e5m2 | int8, with one scale
    # per token and KV head (kv/quant.py)
    kv_cache_dtype: str = "auto"
    # Swap to host: bytes of host KV pool per rank (--kv-offloading-size, alias --swap-space;
    # 0: none) and how a preempted sequence gives up its KV: swap (to the host pool, else
    # recompute) | recompute. None: swap when there is a host pool.
    kv_offloading_size: int = 0
    preemption_mode: str | None = None

    @property
    def world_size(self) -> int:
        """Ranks in all: a TP group of tp_size consecutive ranks per SP rank."""
        return self.tp_size * self.sp_size

    def __post_init__(self) -> None:
        checks = [
            (self.sp_size >= 1, f"--sp-size must be >= 1, got {self.sp_size}"),
            (self.tp_size >= 1, f"--tensor-parallel-size must be >= 1, got {self.tp_size}"),
            (self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"),
             f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"),
            (self.max_model_len is None or self.max_model_len >= 1,
             f"--max-model-len must be >= 1, got {self.max_model_len}"),
            (self.max_num_seqs >= 1, f"--max-num-seqs must be >= 1, got {self.max_num_seqs}"),
            (self.max_num_batched_tokens >= 1,
             f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}"),
            (self.block_size >= 1, f"--block-size must be >= 1, got {self.block_size}"),
            (self.kv_cache_memory is None or self.kv_cache_memory > 0,
             f"--kv-cache-memory must be a positive number of bytes, got {self.kv_cache_memory}"),
            (0.0 < self.gpu_memory_utilization <= 1.0,
             f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}"),
            (self.scheduler in ("slo", "fcfs"), f"--scheduler must be slo or fcfs, got {self.scheduler!r}"),
            (self.ttft_slo_ms > 0, f"--ttft-slo-ms must be > 0, got {self.ttft_slo_ms}"),
            (self.tbt_slo_ms > 0, f"--tbt-slo-ms must be > 0, got {self.tbt_slo_ms}"),
            (self.attn_backend in ("auto", "torch", "triton", "flash-attn"),
             f"--attn-backend must be auto, torch, triton or flash-attn, got {self.attn_backend!r}"),
            (self.dist_timeout_s > 0, f"--dist-timeout must be > 0, got {self.dist_timeout_s}"),
            (self.cpu_comm in ("auto", "shm", "gloo"),
             f"--cpu-comm must be auto, shm or gloo, got {self.cpu_comm!r}"),
            (self.enable_prefix_caching in (None, True, False),
             f"enable_prefix_caching must be True, False or None (the default: on where the model "
             f"allows it), got {self.enable_prefix_caching!r}"),
            (self.kv_offloading_size >= 0,
             f"--kv-offloading-size must be >= 0 bytes, got {self.kv_offloading_size}"),
            (self.preemption_mode in (None, "swap", "recompute"),
             f"--preemption-mode must be swap or recompute, got {self.preemption_mode!r}"),
            (self.preemption_mode != "swap" or self.kv_offloading_size > 0,
             "--preemption-mode swap needs a host pool: give --kv-offloading-size (GiB of host "
             "memory per rank), or use --preemption-mode recompute"),
            (self.kv_cache_dtype in KV_CACHE_DTYPES,
             f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
             f"got {self.kv_cache_dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.preemption_mode is None:
            self.preemption_mode = "swap" if self.kv_offloading_size else "recompute"
        if self.hf_overrides is not None:
            from sp_serve.model.overrides import check_hf_overrides
            check_hf_overrides(self.hf_overrides)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920, '512MB' -> 512e6, '1e9' -> 1e9 (GB = 1e9 bytes, GiB = 2**30)."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size in bytes; write a number with an optional "
                         "unit, e.g. 2GiB, 512MB or 8.59e10 (GB = 1e9 bytes, GiB = 2**30 bytes)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a size in bytes must be positive, got {text!r}")
    return value
