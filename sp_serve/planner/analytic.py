"""Analytic peak-performance model of long-context serving, extended to sequence parallelism.

Follows Yao Fu, "Challenges in Deploying Long-Context Transformers: A Theoretical Peak
Performance Analysis" (2024): a deployment is judged by four numbers, each bound by one
resource -- concurrency (HBM size), prefill (FLOP/s), decode (HBM bandwidth) and context
switching (PCIe). We add SP x TP: ring-attention prefill with zigzag balance, KV sharded in
place over the SP ranks, and decode partials merged by one all-gather of (out, lse) per layer.

Everything here is a pure function of three frozen dataclasses (ModelShape, Hardware,
Deployment), so a scheduler simulator can call `prefill_seconds` / `decode_step_seconds` as
its cost model.

How the paper's FLOPs are counted (reproduced in tests/test_planner.py):
  dense      = 2 x (matmul parameters) x tokens. The embedding lookup is a gather and does
               no FLOPs; the LM head runs for the last prompt token only (that is all
               serving needs). For Yi-34B this is 2 x 33.5e9 x n, i.e. the paper's 2 x 34B x n.
  attention  = per (query, key) pair and layer, 2 x d_q FLOPs (d_q = heads x head_dim), over
               n(n+1)/2 causal pairs: ~ L x n^2 x d_q. That is Kaplan et al.'s 2 x n_layer x
               n_ctx x d_attn per token with the causal mean context n/2, and it is what the
               paper's 14.1 s at 50K needs (50K: 3.35e15 dense + 1.08e15 attention FLOPs ->
               14.2 s at 312 TFLOP/s; 4K: 0.90 s). It counts one of the two attention
               matmuls (QK^T, not PV); Deployment(attn_flops="exact") counts both (4 x d_q
               per pair), which gives 17.6 s at 50K.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sp_serve.planner.hardware import GB, GIB, Hardware

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
# A one-byte KV cache (fp8, int8) also stores a bf16 scale per token and KV head, as sp-serve's
# --kv-cache-dtype does (kv/quant.py): 2 bytes per head_dim elements.
KV_SCALE_BYTES = 2
KV_DTYPES = ("fp32", "bf16", "fp8", "int8")  # the rows of the KV dtype table
ACT_BYTES = 2  # activations that travel (attention outputs, TP all-reduces) are bf16
LSE_BYTES = 4  # log-sum-exp travels in fp32 so the merge stays exact
ATTN_FLOPS_CONVENTIONS = ("paper", "exact")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a dense Llama-family decoder that the cost model needs."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"model {self.name!r}: {name} must be a positive int, got {value!r}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model {self.name!r}: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_matmul_params(self) -> int:
        h = self.hidden_size
        attention = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h  # q, k, v, o
        mlp = 3 * h * self.intermediate_size  # gate, up, down (SwiGLU)
        return attention + mlp

    @property
    def layer_params(self) -> int:
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        return self.layer_matmul_params + bias + 2 * self.hidden_size  # + two RMSNorms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        return (
            self.num_layers * self.layer_params
            + self.embedding_params
            + lm_head
            + self.hidden_size  # final norm
        )

    @property
    def decode_read_params(self) -> int:
        """Parameters read from HBM per decode step: all but the embedding table, of which
        only the batch's rows are gathered (when tied, the table is read whole as LM head)."""
        return self.num_params - (0 if self.tie_word_embeddings else self.embedding_params)

    # --- one tensor-parallel rank's share (Megatron layout, as vLLM and the engine shard) ---

    def kv_heads_per_rank(self, tp: int) -> int:
        """KV heads one of tp ranks holds: num_kv_heads / tp, or 1 (each head replicated on
        tp / num_kv_heads ranks) once tp >= num_kv_heads. check_tp says which tp are valid."""
        return max(1, self.num_kv_heads // tp)

    def vocab_per_rank(self, tp: int) -> int:
        """Rows of the vocabulary-sharded embedding (and LM head) on one rank."""
        return -(-self.vocab_size // tp)

    def layer_matmul_params_per_rank(self, tp: int) -> int:
        """q and o split by head, k and v by KV head (replicated past tp = num_kv_heads), the
        MLP's intermediate dimension split."""
        h, d = self.hidden_size, self.head_dim
        q_heads, kv_heads = self.num_heads // tp, self.kv_heads_per_rank(tp)
        attention = 2 * h * q_heads * d + 2 * h * kv_heads * d  # q, o; k, v
        return attention + 3 * h * (self.intermediate_size // tp)

    def params_per_rank(self, tp: int) -> int:
        """Parameters one TP rank stores: its shard of every matmul and bias, its vocabulary
        rows of the embedding and LM head, and the RMSNorm weights (replicated)."""
        if tp == 1:
            return self.num_params
        d = self.head_dim
        bias = (self.num_heads // tp + 2 * self.kv_heads_per_rank(tp)) * d if self.qkv_bias else 0
        layer = self.layer_matmul_params_per_rank(tp) + bias + 2 * self.hidden_size
        tables = (1 if self.tie_word_embeddings else 2) * self.vocab_per_rank(tp) * self.hidden_size
        return self.num_layers * layer + tables + self.hidden_size

    def decode_read_params_per_rank(self, tp: int) -> int:
        """decode_read_params for one TP rank: its stored parameters less its embedding rows
        (gathered, not read whole), unless tied."""
        table = 0 if self.tie_word_embeddings else self.vocab_per_rank(tp) * self.hidden_size
        return self.params_per_rank(tp) - table


MODEL_PRESETS: dict[str, ModelShape] = {
    "yi-34b-200k": ModelShape(
        name="yi-34b-200k",
        num_layers=60,
        hidden_size=7168,
        num_heads=56,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=20480,
        vocab_size=64000,
    ),
    "llama-3.1-8b": ModelShape(
        name="llama-3.1-8b",
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
    ),
    "llama-3.1-70b": ModelShape(
        name="llama-3.1-70b",
        num_layers=80,
        hidden_size=8192,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=28672,
        vocab_size=128256,
    ),
    "qwen2.5-7b": ModelShape(
        name="qwen2.5-7b",
        num_layers=28,
        hidden_size=3584,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=18944,
        vocab_size=152064,
        qkv_bias=True,
    ),
}


def load_hf_config(path: str | Path) -> ModelShape:
    """ModelShape from a Hugging Face config.json, or a checkpoint directory holding one."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ValueError(
            f"no config.json at {config_path}; pass a checkpoint dir or its config.json"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if any(k in config for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ValueError(
            f"{config_path} describes a mixture-of-experts model; only dense models are modelled"
        )
    missing = [
        k
        for k in (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
        )
        if k not in config
    ]
    if missing:
        raise ValueError(f"{config_path} lacks {missing}; is it a Llama-family config.json?")
    num_heads = config["num_attention_heads"]
    return ModelShape(
        name=str(config.get("_name_or_path") or config_path.resolve().parent.name),
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        # Llama/Mistral/Qwen2 configs default to untied embeddings when the key is absent.
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
    )


def resolve_model(spec: str) -> ModelShape:
    """A preset name, or a path to a config.json / checkpoint directory."""
    if spec.lower() in MODEL_PRESETS:
        return MODEL_PRESETS[spec.lower()]
    if Path(spec).exists():
        return load_hf_config(spec)
    raise ValueError(
        f"unknown model {spec!r}: use a preset {sorted(MODEL_PRESETS)} "
        "or a path to a Hugging Face config.json / checkpoint directory"
    )


@dataclass(frozen=True)
class Deployment:
    """How one model replica is laid out and how close to peak the kernels run."""

    sp_size: int = 1
    tp_size: int = 1
    kv_dtype: str = "bf16"
    weight_dtype: str = "bf16"
    flops_efficiency: float = 1.0  # achieved / peak FLOP/s; 1.0 is the paper's theoretical peak
    bandwidth_efficiency: float = 1.0  # achieved / peak for HBM, interconnect and PCIe
    collective_latency_s: float = 10e-6  # fixed cost of one collective / one ring step
    hbm_utilization: float = 1.0  # fraction of HBM for weights + KV (vLLM's gpu_memory_utilization)
    attn_flops: str = "paper"  # "paper" (Kaplan: QK^T only) or "exact" (QK^T and PV)
    # GPUs per node: a world of sp x tp ranks beyond it spans world / gpus_per_node nodes
    # (torchrun's --nproc-per-node), TP groups being consecutive ranks (inside a node when
    # tp divides gpus_per_node) and the SP ring crossing the nodes.
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        for name in ("sp_size", "tp_size", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        world = self.sp_size * self.tp_size
        if world > self.gpus_per_node and world % self.gpus_per_node:
            raise ValueError(
                f"tp x sp = {self.tp_size} x {self.sp_size} = {world} GPUs span several nodes of "
                f"{self.gpus_per_node} GPUs (--gpus-per-node), but not whole ones: torchrun starts "
                "the same number of ranks on every node, so make tp x sp a multiple of "
                f"{self.gpus_per_node}"
            )
        for name in ("kv_dtype", "weight_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}; choose one of {sorted(DTYPE_BYTES)}"
                )
        for name in ("flops_efficiency", "bandwidth_efficiency", "hbm_utilization"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if self.collective_latency_s < 0:
            raise ValueError(
                f"collective_latency_s must be >= 0, got {self.collective_latency_s!r}"
            )
        if self.attn_flops not in ATTN_FLOPS_CONVENTIONS:
            raise ValueError(
                f"attn_flops={self.attn_flops!r}; choose one of {ATTN_FLOPS_CONVENTIONS}"
            )

    @property
    def world_size(self) -> int:
        return self.sp_size * self.tp_size

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.gpus_per_node)

    @property
    def tp_spans_nodes(self) -> bool:
        """Some TP group has ranks on two nodes (its all-reduces then cross the network)."""
        return self.num_nodes > 1 and (
            self.tp_size > self.gpus_per_node or self.gpus_per_node % self.tp_size != 0
        )


def link_bandwidths(hw: Hardware, dep: Deployment) -> tuple[float, float]:
    """(TP, SP) link bandwidth per GPU per direction, after bandwidth_efficiency. On one node
    both are the interconnect (NVLink). Over several nodes the SP ring has hops between nodes
    and runs at the slowest, the inter-node network; so do the TP all-reduces of a TP group
    that spans nodes (keep tp within a node: a divisor of gpus_per_node)."""
    intra = hw.interconnect_bandwidth * dep.bandwidth_efficiency
    if dep.num_nodes == 1:
        return intra, intra
    if hw.inter_node_bandwidth is None:
        raise ValueError(
            f"tp x sp = {dep.world_size} GPUs span {dep.num_nodes} nodes of {dep.gpus_per_node}: "
            f"give the network's bandwidth per GPU with --inter-node-bw-gbs (hardware {hw.name!r} "
            "has none), or fewer GPUs / a larger --gpus-per-node"
        )
    inter = hw.inter_node_bandwidth * dep.bandwidth_efficiency
    return (inter if dep.tp_spans_nodes else intra), inter


# ---------------------------------------------------------------------------------------------
# Memory


def valid_tp_sizes(shape: ModelShape) -> list[int]:
    """Every tensor-parallel degree the model can be split over: it divides the attention
    heads and the MLP's intermediate size, and it divides the KV heads or is a multiple of
    them (each KV head then replicated on tp / num_kv_heads ranks, as vLLM does)."""
    return [
        t for t in range(1, shape.num_heads + 1)
        if shape.num_heads % t == 0
        and shape.intermediate_size % t == 0
        and (shape.num_kv_heads % t == 0 or t % shape.num_kv_heads == 0)
    ]


def check_tp(shape: ModelShape, tp: int) -> None:
    """ValueError, naming the valid degrees, when the model cannot be split over tp ranks."""
    problems = []
    if shape.num_heads % tp:
        problems.append(f"divide its {shape.num_heads} attention heads")
    if shape.intermediate_size % tp:
        problems.append(f"divide its MLP intermediate size {shape.intermediate_size}")
    if shape.num_kv_heads % tp and tp % shape.num_kv_heads:
        problems.append(f"divide its {shape.num_kv_heads} KV heads or be a multiple of them")
    if problems:
        raise ValueError(
            f"--tp-size {tp} does not fit {shape.name}: the tensor-parallel size must "
            + (", ".join(problems[:-1]) + " and " if len(problems) > 1 else "")
            + problems[-1]
            + f"; use one of {', '.join(map(str, valid_tp_sizes(shape)))} (and give the rest of "
            "the GPUs to --sp-size)"
        )


def kv_heads_per_rank(shape: ModelShape, dep: Deployment) -> int:
    """KV heads one TP rank holds; past tp = num_kv_heads each head is replicated (as vLLM does)."""
    check_tp(shape, dep.tp_size)
    return shape.kv_heads_per_rank(dep.tp_size)


def kv_bytes_per_head(shape: ModelShape, dep: Deployment) -> float:
    """One token's K (or V) of one KV head: head_dim elements, plus a scale when quantized."""
    elem = DTYPE_BYTES[dep.kv_dtype]
    return shape.head_dim * elem + (KV_SCALE_BYTES if elem == 1 else 0)


def kv_bytes_per_token(shape: ModelShape, dep: Deployment) -> float:
    """K and V of one token over all layers, whole model (what one request stores per token)."""
    return 2 * shape.num_layers * shape.num_kv_heads * kv_bytes_per_head(shape, dep)


def kv_bytes_per_token_per_rank(shape: ModelShape, dep: Deployment) -> float:
    """One rank's share: heads split over TP, tokens split evenly over SP (zigzag shards)."""
    per_layer = 2 * kv_heads_per_rank(shape, dep) * kv_bytes_per_head(shape, dep)
    return shape.num_layers * per_layer / dep.sp_size


def weight_bytes_per_rank(shape: ModelShape, dep: Deployment) -> float:
    """Weights are replicated on every SP rank and sharded over TP: each matmul split by head
    or intermediate column (k and v replicated past tp = num_kv_heads), the embedding and LM
    head by vocabulary rows; the RMSNorm weights are whole on every rank."""
    check_tp(shape, dep.tp_size)
    return shape.params_per_rank(dep.tp_size) * DTYPE_BYTES[dep.weight_dtype]


def free_kv_bytes_per_rank(shape: ModelShape, hw: Hardware, dep: Deployment) -> float:
    """HBM left for KV on one rank after the weights; negative when the weights do not fit."""
    return hw.hbm_bytes * dep.hbm_utilization - weight_bytes_per_rank(shape, dep)


def max_concurrency(shape: ModelShape, hw: Hardware, dep: Deployment, context_len: int) -> int:
    """Requests of context_len tokens whose KV fits in one SP x TP group at once."""
    free = free_kv_bytes_per_rank(shape, hw, dep)
    per_request = kv_bytes_per_token_per_rank(shape, dep) * context_len
    return max(0, math.floor(free / per_request))


def max_context_tokens(shape: ModelShape, hw: Hardware, dep: Deployment) -> int:
    """Longest single request whose KV fits in the group: grows linearly with sp_size."""
    free = free_kv_bytes_per_rank(shape, hw, dep)
    return max(0, math.floor(free / kv_bytes_per_token_per_rank(shape, dep)))


def kv_dtype_table(shape: ModelShape, hw: Hardware, dep: Deployment) -> list[dict]:
    """Per KV dtype (Fu 2024's memory table, one column more): bytes per token (whole model,
    scales included), the longest context one GPU holds (this TP degree, no SP) and the
    longest this SP x TP group holds."""
    rows = []
    for kv in KV_DTYPES:
        d = dataclasses.replace(dep, kv_dtype=kv)
        one_gpu = dataclasses.replace(d, sp_size=1)
        rows.append({"kv_dtype": kv, "kv_bytes_per_token": kv_bytes_per_token(shape, d),
                     "max_context_per_gpu": max_context_tokens(shape, hw, one_gpu),
                     "max_context_tokens": max_context_tokens(shape, hw, d)})
    return rows


# ---------------------------------------------------------------------------------------------
# Compute and time


def _flops_per_attention_pair(shape: ModelShape, dep: Deployment) -> float:
    """FLOPs for one (query, key) pair in one layer. 'exact': QK^T and PV, 2 FLOPs per
    multiply-add each -> 4 d_q. 'paper': Kaplan et al.'s 2 d_q (one of the two matmuls)."""
    return (2 if dep.attn_flops == "paper" else 4) * shape.q_dim


def prefill_flops(
    shape: ModelShape, dep: Deployment, num_tokens: int, cached_tokens: int = 0
) -> tuple[float, float]:
    """(dense, attention) FLOPs of prefilling num_tokens new tokens after cached_tokens cached
    ones, one request, whole model (all ranks together)."""
    dense = 2 * shape.layer_matmul_params * shape.num_layers * num_tokens
    dense += 2 * shape.embedding_params  # LM head for the last prompt token only
    # New token i attends to the cached tokens and to new tokens 0..i (causal mask).
    pairs = num_tokens * cached_tokens + num_tokens * (num_tokens + 1) / 2
    attention = _flops_per_attention_pair(shape, dep) * shape.num_layers * pairs
    return float(dense), float(attention)


@dataclass(frozen=True)
class PrefillBreakdown:
    num_tokens: int
    cached_tokens: int
    dense_flops: float  # whole model, all ranks
    attention_flops: float  # whole model, all ranks
    compute_s: float  # per rank: FLOPs / (sp x tp) / effective FLOP/s
    weight_read_s: float  # one pass over the rank's weights; bounds very short chunks
    ring_compute_step_s: float  # attention of one ring step, one layer, one rank
    ring_comm_step_s: float  # one KV block to the next rank, one layer (+ step latency)
    ring_hidden: bool  # the block transfer hides behind the step's attention
    ring_min_tokens_per_rank: float | None  # tokens per rank from which the ring hides
    ring_exposed_s: float  # ring communication not hidden, all layers
    tp_comm_s: float  # TP all-reduces, all layers, not overlapped
    total_s: float


def prefill_breakdown(
    shape: ModelShape, hw: Hardware, dep: Deployment, num_tokens: int, cached_tokens: int = 0
) -> PrefillBreakdown:
    if num_tokens < 1 or cached_tokens < 0:
        raise ValueError(
            f"need num_tokens >= 1 and cached_tokens >= 0, got {num_tokens}, {cached_tokens}"
        )
    sp, tp, layers = dep.sp_size, dep.tp_size, shape.num_layers
    flops_s = hw.peak_flops * dep.flops_efficiency
    tp_bw, link_bw = link_bandwidths(hw, dep)  # link_bw: the SP ring's
    latency = dep.collective_latency_s

    dense, attention = prefill_flops(shape, dep, num_tokens, cached_tokens)
    # Zigzag gives every rank the same share of dense and causal attention work; a TP rank
    # runs its shard of every matmul (k and v whole per KV head it holds, so replicated heads
    # repeat their projections) and 1/tp of the query heads' attention.
    check_tp(shape, tp)
    dense_rank = dense / sp
    if tp > 1:
        dense_rank = 2 * (
            shape.layer_matmul_params_per_rank(tp) * layers * num_tokens
            + shape.vocab_per_rank(tp) * shape.hidden_size
        ) / sp
    compute_s = (dense_rank + attention / (sp * tp)) / flops_s
    weight_read_s = weight_bytes_per_rank(shape, dep) / (
        hw.hbm_bandwidth * dep.bandwidth_efficiency
    )

    # Ring: sp steps per layer over the chunk's fresh KV; in each, a rank attends its queries to
    # the block in hand (1/sp^2 of the chunk's causal attention, equal on every step under
    # zigzag) while the next block -- num_tokens/sp tokens of KV -- travels to the neighbour.
    # Cached tokens never travel: the chunk's queries are all-gathered, every rank attends them
    # to its own shard, and an all-to-all returns the (out, lse) partials (not overlapped).
    kv_token_layer_bytes = (
        2 * kv_heads_per_rank(shape, dep) * kv_bytes_per_head(shape, dep)
    )
    ring_min_tokens: float | None = None
    cached_comm_s = 0.0
    if sp > 1:
        fresh_attention = prefill_flops(shape, dep, num_tokens, 0)[1]
        ring_compute_step_s = fresh_attention / layers / (sp * sp * tp) / flops_s
        block_tokens = num_tokens / sp
        ring_comm_step_s = latency + block_tokens * kv_token_layer_bytes / link_bw
        ring_exposed_s = layers * (sp - 1) * max(0.0, ring_comm_step_s - ring_compute_step_s)
        # Fresh prompt, b tokens per rank: compute a*b^2 (b^2/2 pairs per step), comm k*b + latency.
        a = _flops_per_attention_pair(shape, dep) / 2 / tp / flops_s
        k = kv_token_layer_bytes / link_bw
        ring_min_tokens = (k + math.sqrt(k * k + 4 * a * latency)) / (2 * a)
        if cached_tokens > 0:
            q_heads = shape.num_heads / tp
            q_bytes = num_tokens * q_heads * shape.head_dim * ACT_BYTES
            partial_bytes = num_tokens * q_heads * (shape.head_dim + 1) * 4  # fp32 out + lse
            moved = (sp - 1) / sp * (q_bytes + partial_bytes)
            cached_comm_s = layers * (2 * latency + moved / link_bw)
    else:
        ring_compute_step_s = ring_comm_step_s = ring_exposed_s = 0.0

    # Two all-reduces per layer (after o_proj and after down_proj) of this rank's tokens.
    tp_comm_s = tp_allreduce_seconds(shape, dep, num_tokens / sp, tp_bw)

    total_s = max(compute_s, weight_read_s) + ring_exposed_s + cached_comm_s + tp_comm_s
    return PrefillBreakdown(
        num_tokens=num_tokens,
        cached_tokens=cached_tokens,
        dense_flops=dense,
        attention_flops=attention,
        compute_s=compute_s,
        weight_read_s=weight_read_s,
        ring_compute_step_s=ring_compute_step_s,
        ring_comm_step_s=ring_comm_step_s,
        ring_hidden=ring_comm_step_s <= ring_compute_step_s,
        ring_min_tokens_per_rank=ring_min_tokens,
        ring_exposed_s=ring_exposed_s,
        tp_comm_s=tp_comm_s,
        total_s=total_s,
    )


def tp_allreduce_seconds(
    shape: ModelShape, dep: Deployment, tokens: float, bandwidth: float
) -> float:
    """The TP group's all-reduces over all layers: two per layer (the attention output after
    o_proj, the MLP output after down_proj), each of tokens x hidden bf16 activations, as a
    ring all-reduce (reduce-scatter + all-gather: each rank sends 2 (tp - 1) / tp of the
    bytes) plus one collective latency. Not overlapped with compute."""
    tp = dep.tp_size
    if tp == 1:
        return 0.0
    nbytes = tokens * shape.hidden_size * ACT_BYTES
    per_allreduce = dep.collective_latency_s + 2 * (tp - 1) / tp * nbytes / bandwidth
    return shape.num_layers * 2 * per_allreduce


def prefill_seconds(
    shape: ModelShape, hw: Hardware, dep: Deployment, num_tokens: int, cached_tokens: int = 0
) -> float:
    """Wall time of one prefill step of num_tokens new tokens after cached_tokens cached ones."""
    return prefill_breakdown(shape, hw, dep, num_tokens, cached_tokens).total_s


@dataclass(frozen=True)
class DecodeBreakdown:
    batch_size: int
    total_context_tokens: int  # KV tokens the step's attention reads, whole batch
    weight_bytes_per_rank: float  # read once per step
    kv_bytes_per_rank: float  # this rank's shard of the batch's KV, read once per step
    memory_s: float
    flops_per_rank: float
    compute_s: float
    merge_comm_s: float  # SP all-gather of (out, lse), all layers
    tp_comm_s: float  # TP all-reduces, all layers
    total_s: float


def _decode_step(
    shape: ModelShape, hw: Hardware, dep: Deployment, batch_size: int, total_context: int
) -> DecodeBreakdown:
    sp, tp, layers = dep.sp_size, dep.tp_size, shape.num_layers
    tp_bw, link_bw = link_bandwidths(hw, dep)  # link_bw: the SP merge's
    latency = dep.collective_latency_s

    check_tp(shape, tp)
    weight_bytes = shape.decode_read_params_per_rank(tp) * DTYPE_BYTES[dep.weight_dtype]
    kv_bytes = kv_bytes_per_token_per_rank(shape, dep) * total_context
    memory_s = (weight_bytes + kv_bytes) / (hw.hbm_bandwidth * dep.bandwidth_efficiency)
    # Every SP rank runs the dense layers for the whole batch (they are replicated over SP, a
    # TP rank runs its shard); attention is split with the KV (SP) and the query heads (TP).
    dense = 2 * (shape.layer_matmul_params * layers + shape.embedding_params) * batch_size
    if tp > 1:
        dense = 2 * (
            shape.layer_matmul_params_per_rank(tp) * layers
            + shape.vocab_per_rank(tp) * shape.hidden_size
        ) * batch_size
    attention = _flops_per_attention_pair(shape, dep) * layers * total_context / (sp * tp)
    compute_s = (dense + attention) / (hw.peak_flops * dep.flops_efficiency)

    merge_comm_s = 0.0
    if sp > 1:
        heads = shape.num_heads // tp
        per_rank = batch_size * heads * (shape.head_dim * ACT_BYTES + LSE_BYTES)
        merge_comm_s = layers * (latency + (sp - 1) * per_rank / link_bw)
    tp_comm_s = tp_allreduce_seconds(shape, dep, batch_size, tp_bw)

    return DecodeBreakdown(
        batch_size=batch_size,
        total_context_tokens=total_context,
        weight_bytes_per_rank=weight_bytes,
        kv_bytes_per_rank=kv_bytes,
        memory_s=memory_s,
        flops_per_rank=dense + attention,
        compute_s=compute_s,
        merge_comm_s=merge_comm_s,
        tp_comm_s=tp_comm_s,
        total_s=max(memory_s, compute_s) + merge_comm_s + tp_comm_s,
    )


def decode_step_breakdown(
    shape: ModelShape, hw: Hardware, dep: Deployment, batch_context_lens: list[int]
) -> DecodeBreakdown:
    if not batch_context_lens or min(batch_context_lens) < 1:
        raise ValueError(
            "batch_context_lens must be a non-empty list of positive ints, "
            f"got {batch_context_lens!r}"
        )
    return _decode_step(shape, hw, dep, len(batch_context_lens), sum(batch_context_lens))


def decode_step_seconds(
    shape: ModelShape, hw: Hardware, dep: Deployment, batch_context_lens: list[int]
) -> float:
    """Wall time of one decode step for a batch whose sequences hold these many KV tokens."""
    return decode_step_breakdown(shape, hw, dep, batch_context_lens).total_s


def context_switch_seconds(
    shape: ModelShape, hw: Hardware, dep: Deployment, context_len: int
) -> float:
    """Moving one request's KV between HBM and host memory, one way: every rank copies its own
    shard over its own PCIe link, in parallel."""
    shard = kv_bytes_per_token_per_rank(shape, dep) * context_len
    return shard / (hw.pcie_bandwidth * dep.bandwidth_efficiency)


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class PlanResult:
    model: str
    hardware: str
    sp_size: int
    tp_size: int
    num_gpus: int
    context_len: int
    output_len: int
    batch_size: int
    num_params: int
    weight_bytes_per_rank: float
    kv_bytes_per_token: float
    kv_bytes_per_token_per_rank: float
    kv_bytes_per_request: float
    kv_bytes_per_request_per_rank: float
    free_kv_bytes_per_rank: float
    max_concurrency: int  # requests of context_len tokens per SP x TP group
    max_context_tokens: int  # longest single request the group holds
    prefill: PrefillBreakdown
    decode_first_step: DecodeBreakdown  # batch_size requests at context_len
    decode_step_s: float  # mean over the output tokens after the first (= TPOT)
    decode_total_s: float  # output_len - 1 steps; the first token comes from prefill
    ttft_s: float
    e2e_s: float
    context_switch_s: float  # one way, HBM -> host or back
    context_switch_round_trip_s: float
    # HBM one GPU needs: its weights + its share of batch_size requests' KV at context_len
    memory_per_gpu_bytes: float = 0.0
    usable_hbm_bytes: float = 0.0  # HBM x hbm_utilization
    num_nodes: int = 1
    kv_heads_per_rank: int = 0
    launch: dict = field(default_factory=dict)  # sp_serve.planner.launch.Launch.to_dict()
    warnings: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    kv_dtypes: list[dict] = field(default_factory=list)  # kv_dtype_table

    @property
    def fits(self) -> bool:
        return self.memory_per_gpu_bytes <= self.usable_hbm_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}


def plan(
    shape: ModelShape,
    hw: Hardware,
    dep: Deployment,
    context_len: int,
    output_len: int = 250,
    batch_size: int = 1,
    model_path: str | None = None,
) -> PlanResult:
    """Everything the `plan` command prints, for batch_size requests of context_len tokens
    each generating output_len tokens (250 is the paper's decoding example). model_path: the
    checkpoint the launch line names (None: "$MODEL")."""
    from sp_serve.planner.launch import launch_for

    check_tp(shape, dep.tp_size)
    for name, value in (
        ("context_len", context_len),
        ("output_len", output_len),
        ("batch_size", batch_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    prefill = prefill_breakdown(shape, hw, dep, context_len)
    first = _decode_step(shape, hw, dep, batch_size, batch_size * (context_len + 1))
    # Step i attends to context_len + i + 1 tokens (the prompt, earlier outputs, itself).
    decode_total = sum(
        _decode_step(shape, hw, dep, batch_size, batch_size * (context_len + i + 1)).total_s
        for i in range(output_len - 1)
    )
    decode_step_s = decode_total / (output_len - 1) if output_len > 1 else first.total_s
    switch = context_switch_seconds(shape, hw, dep, context_len)
    concurrency = max_concurrency(shape, hw, dep, context_len)
    free = free_kv_bytes_per_rank(shape, hw, dep)

    warnings: list[str] = []
    if free <= 0:
        warnings.append(
            f"weights ({weight_bytes_per_rank(shape, dep) / GB:.1f} GB per rank) do not fit in "
            f"{hw.hbm_bytes * dep.hbm_utilization / GB:.1f} GB of HBM: raise --tp-size or use a "
            "smaller --weight-dtype"
        )
    elif concurrency < batch_size:
        # KV per rank scales as 1/sp while the free HBM per rank stays put.
        kv_batch_one_rank = (
            kv_bytes_per_token_per_rank(shape, dep) * dep.sp_size * context_len * batch_size
        )
        warnings.append(
            f"only {concurrency} request(s) of {context_len} tokens fit per group, fewer than "
            f"batch_size {batch_size}: sp_size >= {math.ceil(kv_batch_one_rank / free)} at "
            f"tp_size {dep.tp_size} would hold them (a larger tp_size also frees HBM: fewer "
            "weights and KV heads per GPU)"
        )
    if dep.sp_size > 1 and not prefill.ring_hidden:
        warnings.append(
            f"ring KV transfer ({prefill.ring_comm_step_s * 1e6:.0f} us/step) exceeds the step's "
            f"attention ({prefill.ring_compute_step_s * 1e6:.0f} us): prefill chunks need "
            f">= {prefill.ring_min_tokens_per_rank:.0f} tokens per rank to hide it"
        )

    if dep.tp_spans_nodes:
        warnings.append(
            f"TP groups of {dep.tp_size} span nodes of {dep.gpus_per_node} GPUs: their "
            "all-reduces run at the inter-node bandwidth; use a --tp-size dividing "
            f"{dep.gpus_per_node} and more --sp-size"
        )

    kv_tok = kv_bytes_per_token(shape, dep)
    kv_tok_rank = kv_bytes_per_token_per_rank(shape, dep)
    memory_per_gpu = weight_bytes_per_rank(shape, dep) + kv_tok_rank * context_len * batch_size
    return PlanResult(
        model=shape.name,
        hardware=hw.name,
        sp_size=dep.sp_size,
        tp_size=dep.tp_size,
        num_gpus=dep.sp_size * dep.tp_size,
        context_len=context_len,
        output_len=output_len,
        batch_size=batch_size,
        num_params=shape.num_params,
        weight_bytes_per_rank=weight_bytes_per_rank(shape, dep),
        kv_bytes_per_token=kv_tok,
        kv_bytes_per_token_per_rank=kv_tok_rank,
        kv_bytes_per_request=kv_tok * context_len,
        kv_bytes_per_request_per_rank=kv_tok_rank * context_len,
        free_kv_bytes_per_rank=free,
        max_concurrency=concurrency,
        max_context_tokens=max_context_tokens(shape, hw, dep),
        prefill=prefill,
        decode_first_step=first,
        decode_step_s=decode_step_s,
        decode_total_s=decode_total,
        ttft_s=prefill.total_s,
        e2e_s=prefill.total_s + decode_total,
        context_switch_s=switch,
        context_switch_round_trip_s=2 * switch,
        memory_per_gpu_bytes=memory_per_gpu,
        usable_hbm_bytes=hw.hbm_bytes * dep.hbm_utilization,
        num_nodes=dep.num_nodes,
        kv_heads_per_rank=kv_heads_per_rank(shape, dep),
        launch=launch_for(dep, model_path).to_dict(),
        warnings=warnings,
        assumptions=assumptions(shape, hw, dep),
        kv_dtypes=kv_dtype_table(shape, hw, dep),
    )


def _gbs(bandwidth: float | None) -> str:
    return "not given" if bandwidth is None else f"{bandwidth / GB:g} GB/s"


def assumptions(shape: ModelShape, hw: Hardware, dep: Deployment) -> list[str]:
    """Every modelling choice, in words, for the table footer and the JSON."""
    attn = (
        "attention FLOPs as in the paper (Kaplan et al.): 2 x d_q per (query, key) pair and "
        "layer over the n(n+1)/2 causal pairs, ~L x n^2 x d_q; this counts QK^T but not PV "
        "(--attn-flops exact doubles it)"
        if dep.attn_flops == "paper"
        else "attention FLOPs exact: 4 x d_q per (query, key) pair and layer (QK^T and PV) "
        "over the n(n+1)/2 causal pairs, ~2 x L x n^2 x d_q (the paper counts half of this)"
    )
    return [
        (
            "units: GB = 1e9 bytes, GiB = 2^30 bytes, bandwidths in 1e9 bytes/s; preset HBM sizes "
            f"are GiB as the device reports them ({hw.name}: {hw.hbm_bytes / GIB:.0f} GiB = "
            f"{hw.hbm_bytes / GB:.1f} GB)"
        ),
        (
            f"utilisation: flops_efficiency={dep.flops_efficiency:.2f}, bandwidth_efficiency="
            f"{dep.bandwidth_efficiency:.2f}, hbm_utilization={dep.hbm_utilization:.2f} "
            "(1.0 = the paper's theoretical peak; real kernels reach roughly 0.5-0.8)"
        ),
        (
            "dense FLOPs = 2 x matmul parameters x tokens; the embedding lookup is a gather (no "
            "FLOPs); the LM head runs for the last prompt token only"
        ),
        attn,
        (
            f"weights: {shape.num_params / 1e9:.2f}B parameters in {dep.weight_dtype}, replicated "
            "on every SP rank and sharded over TP ranks as Megatron/vLLM do: q, o and the MLP "
            "split by head and intermediate column, k and v by KV head (replicated once tp > "
            "num_kv_heads), embedding and LM head by vocabulary rows, RMSNorms whole; peak "
            "FLOP/s is the bf16 figure whatever the weight dtype"
        ),
        (
            f"KV cache in {dep.kv_dtype}: 2 (K, V) x layers x kv_heads x head_dim bytes per token, "
            "sharded evenly over SP ranks (zigzag) and by head over TP ranks: max(1, kv_heads / "
            "tp) per rank (heads replicated when tp > num_kv_heads); the SP ring and the decode "
            "merge carry only the rank's heads"
        ),
        (
            "HBM holds weights + KV only: activations, CUDA graphs, NCCL buffers and allocator "
            "fragmentation are not counted (lower --hbm-utilization to reserve room)"
        ),
        (
            "concurrency = floor(free HBM per rank / KV of one request of --context-len tokens per "
            "rank), per SP x TP group; output tokens' KV is not counted, as in the paper"
        ),
        (
            "prefill = max(FLOPs / (sp x tp x effective FLOP/s), one read of the rank's weights) + "
            "exposed ring communication + TP all-reduces; zigzag makes every rank's share equal"
        ),
        (
            "ring step (per layer): the next KV block of the chunk, chunk tokens/sp, travels over "
            "the interconnect (+ one collective latency) while 1/sp^2 of the chunk's causal "
            "attention runs; only the excess over compute is exposed, on sp - 1 of the sp steps; "
            "a chunk after cached tokens adds, per layer, an all-gather of its queries and an "
            "all-to-all of (out, lse) partials (cached KV stays in place), not overlapped"
        ),
        (
            "decode step = max((weights read + KV shard read) / HBM bandwidth, FLOPs / peak) + "
            "communication; dense layers run on every SP rank for the whole batch; the embedding "
            "table is not read (only the batch's rows)"
        ),
        (
            f"decode merge: one all-gather of (out in bf16, lse in fp32) per layer over sp ranks, "
            f"{dep.collective_latency_s * 1e6:.0f} us latency each + bytes / interconnect, counted "
            "as exposed (micro-batch overlap in the engine can hide part of it)"
        ),
        (
            "TP: two all-reduces per layer (after o_proj and down_proj) of tokens x hidden bf16 "
            "activations (prefill: the rank's tokens/sp; decode: the batch), ring all-reduce "
            "2(tp-1)/tp x bytes over the interconnect + one collective latency each, exposed, in "
            "both TTFT and TBT"
        ),
        (
            f"nodes: tp x sp GPUs at {dep.gpus_per_node} per node (--gpus-per-node); over several "
            "nodes the SP ring and merge run at the inter-node bandwidth "
            f"({_gbs(hw.inter_node_bandwidth)} per GPU per direction), and TP groups stay on "
            f"NVLink while tp divides {dep.gpus_per_node}"
        ),
        (
            "interconnect and PCIe bandwidths are per GPU per direction; context switch: each "
            "rank copies its KV shard over its own PCIe x16 link, all ranks in parallel"
        ),
        (
            "decode total covers output_len - 1 steps (the first token comes from prefill), with "
            "the context growing by one token per step"
        ),
    ]
