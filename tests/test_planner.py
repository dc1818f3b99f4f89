"""The analytic planner against the paper's worked example (Yao Fu 2024, Yi-34B-200K on one
A100-80GB at 4K and 50K context) and the SP / TP extension's invariants.

The paper's numbers: KV cache ~1 GB vs ~12.3 GB per request; prefill 0.89 s vs 14.1 s;
decoding 250 tokens 8.5 s vs 9.8 s; about 20 concurrent users at 4K vs 1 at 50K.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest

from sp_serve.planner import cli
from sp_serve.planner.analytic import (
    MODEL_PRESETS,
    Deployment,
    ModelShape,
    context_switch_seconds,
    decode_step_breakdown,
    decode_step_seconds,
    kv_bytes_per_token,
    kv_bytes_per_token_per_rank,
    kv_heads_per_rank,
    link_bandwidths,
    load_hf_config,
    plan,
    prefill_breakdown,
    prefill_flops,
    prefill_seconds,
    resolve_model,
    valid_tp_sizes,
)
from sp_serve.planner.hardware import GB, GIB, Hardware, get_hardware, parse_bytes

YI = MODEL_PRESETS["yi-34b-200k"]
A100 = get_hardware("a100-80g")
PAPER = Deployment()  # theoretical peak, bf16 weights and KV, one GPU
K4, K50 = 4096, 50_000


def close(value: float, expected: float, rel: float) -> bool:
    return abs(value - expected) <= rel * abs(expected)


# --- the paper's worked example ----------------------------------------------------------------


def test_kv_cache_per_token_and_request_match_paper():
    # 60 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes
    assert kv_bytes_per_token(YI, PAPER) == 60 * 8 * 128 * 2 * 2 == 245_760
    assert close(plan(YI, A100, PAPER, K4).kv_bytes_per_request / GB, 1.0, 0.10)
    assert close(plan(YI, A100, PAPER, K50).kv_bytes_per_request / GB, 12.3, 0.10)


def test_kv_dtype_table_adds_the_quantized_caches_scales_and_their_context():
    """Fu 2024's memory table with a column per KV dtype: a one-byte cache stores a bf16 scale
    per token and KV head (as sp-serve's --kv-cache-dtype), so fp8/int8 hold 128/65 x the bf16
    context at head_dim 128, and the longest context grows with SP."""
    rows = {r["kv_dtype"]: r for r in plan(YI, A100, PAPER, K50).kv_dtypes}
    assert rows["bf16"]["kv_bytes_per_token"] == 245_760
    assert rows["fp32"]["kv_bytes_per_token"] == 2 * 245_760
    assert rows["fp8"]["kv_bytes_per_token"] == rows["int8"]["kv_bytes_per_token"] \
        == 60 * 8 * 2 * (128 + 2)
    assert rows["bf16"]["max_context_per_gpu"] == plan(YI, A100, PAPER, K50).max_context_tokens
    ratio = rows["fp8"]["max_context_per_gpu"] / rows["bf16"]["max_context_per_gpu"]
    assert close(ratio, 256 / 130, 1e-4)
    sp4 = {r["kv_dtype"]: r for r in plan(YI, A100, dataclasses.replace(PAPER, sp_size=4),
                                           K50).kv_dtypes}
    assert sp4["int8"]["max_context_per_gpu"] == rows["int8"]["max_context_per_gpu"]
    assert close(sp4["int8"]["max_context_tokens"], 4 * rows["int8"]["max_context_tokens"], 1e-4)


def test_prefill_matches_paper_0_89s_and_14_1s():
    short, long = plan(YI, A100, PAPER, K4), plan(YI, A100, PAPER, K50)
    assert close(short.prefill.total_s, 0.89, 0.10)
    assert close(long.prefill.total_s, 14.1, 0.10)
    # The counting that gets there: dense = 2 x ~34B x n (matmul parameters, no embedding
    # gather) and attention ~ L x n^2 x d_q (Kaplan's per-token 2 L ctx d with mean ctx n/2).
    dense, attention = prefill_flops(YI, PAPER, K50)
    assert close(dense, 2 * 34e9 * K50, 0.03)
    assert close(attention, YI.num_layers * K50**2 * YI.q_dim, 1e-3)
    # Counting both attention matmuls (QK^T and PV) would overshoot the paper by ~25%.
    exact = plan(YI, A100, Deployment(attn_flops="exact"), K50).prefill.total_s
    assert close(prefill_flops(YI, Deployment(attn_flops="exact"), K50)[1], 2 * attention, 1e-9)
    assert not close(exact, 14.1, 0.10)


def test_decode_matches_paper_8_5s_and_9_8s_for_250_tokens():
    # Decode reads the weights (68 GB) plus the request's KV once per token at 2039 GB/s.
    step_4k = decode_step_seconds(YI, A100, PAPER, [K4])
    step_50k = decode_step_seconds(YI, A100, PAPER, [K50])
    assert close(250 * step_4k, 8.5, 0.05)
    assert close(250 * step_50k, 9.8, 0.05)
    assert close(plan(YI, A100, PAPER, K50, output_len=251).decode_total_s, 9.8, 0.05)


def test_concurrency_about_20_at_4k_and_1_at_50k():
    # Free HBM = 80 GiB (85.9 GB, what an "80GB" A100 holds) - 68.8 GB of bf16 weights
    # = 17.1 GB -> 17 requests of 1.0 GB at 4K (paper: ~20) and 1 of 12.3 GB at 50K.
    # Reading "80 GB" as 80e9 would give 11 and 0: the paper's 1 user at 50K needs GiB.
    assert plan(YI, A100, PAPER, K4).max_concurrency == 17
    assert plan(YI, A100, PAPER, K50).max_concurrency == 1
    decimal = Hardware("a100-80e9", 312e12, 80e9, 2.039e12, 300e9, 32e9)
    assert plan(YI, decimal, PAPER, K4).max_concurrency == 11
    assert plan(YI, decimal, PAPER, K50).max_concurrency == 0


def test_context_switch_is_kv_over_pcie():
    assert close(context_switch_seconds(YI, A100, PAPER, K50), 12.288e9 / 32e9, 1e-9)
    result = plan(YI, A100, PAPER, K50)
    assert result.context_switch_round_trip_s == 2 * result.context_switch_s


# --- the SP / TP extension -----------------------------------------------------------------------


def test_sp_halves_per_rank_kv_and_prefill_compute_but_not_weights():
    one = plan(YI, A100, Deployment(sp_size=1), K50)
    two = plan(YI, A100, Deployment(sp_size=2), K50)
    assert close(two.kv_bytes_per_request_per_rank, one.kv_bytes_per_request_per_rank / 2, 1e-12)
    assert close(two.prefill.compute_s, one.prefill.compute_s / 2, 1e-12)
    assert two.weight_bytes_per_rank == one.weight_bytes_per_rank  # replicated, not sharded
    assert two.max_context_tokens in (2 * one.max_context_tokens, 2 * one.max_context_tokens + 1)
    assert two.max_concurrency == 2  # 2 x 17.1 GB free over 12.3 GB
    assert two.context_switch_s == one.context_switch_s / 2  # each rank moves half over its link
    # Decode reads half the KV per rank but pays one (out, lse) all-gather per layer.
    d1 = decode_step_breakdown(YI, A100, Deployment(sp_size=1), [K50])
    d2 = decode_step_breakdown(YI, A100, Deployment(sp_size=2), [K50])
    assert d2.kv_bytes_per_rank == d1.kv_bytes_per_rank / 2
    assert d1.merge_comm_s == 0 and d2.merge_comm_s >= YI.num_layers * 10e-6
    assert d2.total_s < d1.total_s


def test_ring_hides_behind_compute_only_for_large_blocks():
    dep = Deployment(sp_size=4)
    threshold = prefill_breakdown(YI, A100, dep, 4 * 2048).ring_min_tokens_per_rank
    assert threshold is not None and 100 < threshold < 5000
    above = prefill_breakdown(YI, A100, dep, 4 * math.ceil(threshold * 1.1))
    below = prefill_breakdown(YI, A100, dep, 4 * math.floor(threshold * 0.9))
    assert above.ring_hidden and above.ring_exposed_s == 0
    assert not below.ring_hidden and below.ring_exposed_s > 0
    # What is exposed is never more than the ring's whole transfer time ((sp - 1) steps per
    # layer), and a smaller block leaves a larger share of it exposed.
    assert below.ring_exposed_s < YI.num_layers * 3 * below.ring_comm_step_s
    smaller = prefill_breakdown(YI, A100, dep, 4 * math.floor(threshold * 0.3))
    share = lambda b: b.ring_exposed_s / (YI.num_layers * 3 * b.ring_comm_step_s)  # noqa: E731
    assert share(smaller) > share(below) > 0
    assert prefill_breakdown(YI, A100, Deployment(), 1024).ring_min_tokens_per_rank is None


LLAMA70 = MODEL_PRESETS["llama-3.1-70b"]
H100 = get_hardware("h100-sxm")
K128 = 131_072


def test_llama_3_1_70b_preset_is_the_real_config():
    assert (LLAMA70.num_layers, LLAMA70.hidden_size, LLAMA70.num_heads, LLAMA70.num_kv_heads,
            LLAMA70.head_dim, LLAMA70.intermediate_size, LLAMA70.vocab_size) == (
        80, 8192, 64, 8, 128, 28672, 128256)
    assert not LLAMA70.tie_word_embeddings and not LLAMA70.qkv_bias


def test_tp_shards_weights_as_megatron_and_kv_heads_as_vllm():
    one, two = plan(YI, A100, Deployment(), K4), plan(YI, A100, Deployment(tp_size=2), K4)
    norms = (2 * YI.num_layers + 1) * YI.hidden_size  # RMSNorm weights, whole on every rank
    assert two.weight_bytes_per_rank == (YI.num_params + norms) / 2 * 2  # bf16
    assert two.kv_bytes_per_request_per_rank == one.kv_bytes_per_request_per_rank / 2
    assert two.prefill.tp_comm_s > 0 and one.prefill.tp_comm_s == 0
    # Every matmul, the embedding and the LM head (vocabulary rows) split 8 ways.
    h, L = LLAMA70.hidden_size, LLAMA70.num_layers
    tp8 = Deployment(tp_size=8)
    assert LLAMA70.params_per_rank(8) * 8 == LLAMA70.num_params + 7 * (2 * L + 1) * h
    assert LLAMA70.vocab_per_rank(8) == 16032
    assert plan(LLAMA70, H100, tp8, K4).weight_bytes_per_rank == 2 * LLAMA70.params_per_rank(8)
    # KV heads per rank: max(1, 8 / tp); past tp = 8 each head (and its k, v projections) is
    # replicated, so a rank's KV and weights stop shrinking as 1/tp.
    assert [kv_heads_per_rank(LLAMA70, Deployment(tp_size=t)) for t in (1, 2, 4, 8, 16, 32)] \
        == [8, 4, 2, 1, 1, 1]
    assert kv_bytes_per_token_per_rank(LLAMA70, Deployment(tp_size=16)) \
        == kv_bytes_per_token_per_rank(LLAMA70, tp8) == L * 2 * 1 * 128 * 2
    kv_proj = 2 * h * 128  # one KV head's k and v projections
    assert (LLAMA70.layer_matmul_params_per_rank(16)
            == (LLAMA70.layer_matmul_params - 8 * kv_proj) / 16 + kv_proj)
    with pytest.raises(ValueError, match=r"--tp-size 3 does not fit llama-3.1-70b.*"
                       r"64 attention heads.*use one of 1, 2, 4, 8, 16, 32, 64"):
        kv_heads_per_rank(LLAMA70, Deployment(tp_size=3))
    qwen = MODEL_PRESETS["qwen2.5-7b"]  # 28 heads, 4 KV heads, intermediate 18944
    assert valid_tp_sizes(qwen) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"--tp-size 8 .* 28 attention heads; use one of 1, 2, 4 "
                       r"\(and give the rest of the GPUs to --sp-size\)"):
        plan(qwen, H100, Deployment(tp_size=8), K4)


def test_tp_all_reduces_two_per_layer_in_ttft_and_tbt():
    """hidden x tokens x 2 bytes per all-reduce, ring 2(T-1)/T over NVLink, + one latency."""
    dep = Deployment(tp_size=4, sp_size=2)
    lat, bw, L = dep.collective_latency_s, H100.interconnect_bandwidth, LLAMA70.num_layers
    p = prefill_breakdown(LLAMA70, H100, dep, K128)
    per_rank_bytes = K128 / 2 * 8192 * 2
    assert p.tp_comm_s == pytest.approx(2 * L * (lat + 2 * 3 / 4 * per_rank_bytes / bw))
    assert p.total_s == pytest.approx(
        max(p.compute_s, p.weight_read_s) + p.ring_exposed_s + p.tp_comm_s)
    d = decode_step_breakdown(LLAMA70, H100, dep, [K128] * 4)
    assert d.tp_comm_s == pytest.approx(2 * L * (lat + 2 * 3 / 4 * 4 * 8192 * 2 / bw))
    assert d.total_s == pytest.approx(max(d.memory_s, d.compute_s) + d.merge_comm_s + d.tp_comm_s)
    # Decode reads 1/tp of the weights (less the embedding rows, only gathered) per rank.
    assert d.weight_bytes_per_rank == 2 * (LLAMA70.params_per_rank(4) - 32064 * 8192)
    # More TP: more all-reduce traffic per rank in prefill (2(T-1)/T of a larger share of
    # tokens), the same compute over the same 8 GPUs.
    t8, t2 = (prefill_breakdown(LLAMA70, H100, Deployment(tp_size=t, sp_size=8 // t), K128)
              for t in (8, 2))
    assert t8.tp_comm_s > p.tp_comm_s > t2.tp_comm_s
    assert t8.compute_s == pytest.approx(p.compute_s) == pytest.approx(t2.compute_s)


def test_sp_ring_carries_only_the_ranks_kv_heads():
    lat, bw = 10e-6, H100.interconnect_bandwidth
    for tp, heads in ((1, 8), (4, 2), (8, 1)):
        dep = Deployment(tp_size=tp, sp_size=2, gpus_per_node=16)  # all on NVLink
        p = prefill_breakdown(LLAMA70, H100, dep, K128)
        block = K128 / 2 * 2 * heads * 128 * 2  # one layer's K and V of the rank's heads
        assert p.ring_comm_step_s == pytest.approx(lat + block / bw)
        d = decode_step_breakdown(LLAMA70, H100, dep, [K128])
        merge = LLAMA70.num_layers * (lat + 1 * (64 // tp) * (128 * 2 + 4) / bw)
        assert d.merge_comm_s == pytest.approx(merge)


def test_memory_per_gpu_and_the_8xh100_layouts():
    """Llama-3.1-70B on 8 x H100 at 128K and 1M: TP 8 x SP 1, TP 4 x SP 2, TP 2 x SP 4."""
    def run(tp, context):
        dep = Deployment(tp_size=tp, sp_size=8 // tp, hbm_utilization=0.9)
        return plan(LLAMA70, H100, dep, context)

    for context in (K128, 1_000_000):
        rows = [run(tp, context) for tp in (8, 4, 2)]
        for r in rows:
            assert r.memory_per_gpu_bytes == r.weight_bytes_per_rank + \
                r.kv_bytes_per_request_per_rank
            # the same KV per GPU: every layout splits the request's KV 8 ways
            assert r.kv_bytes_per_request_per_rank == pytest.approx(
                rows[0].kv_bytes_per_request_per_rank)
        # weights double as TP halves; TBT grows with them (decode is HBM-bound)
        assert [r.weight_bytes_per_rank for r in rows] == sorted(r.weight_bytes_per_rank
                                                                 for r in rows)
        assert rows[0].decode_step_s < rows[1].decode_step_s < rows[2].decode_step_s
        # TTFT: the same compute, less TP traffic with less TP
        assert rows[0].ttft_s > rows[1].ttft_s > rows[2].ttft_s
    assert run(2, K128).fits and not run(2, 1_000_000).fits
    assert run(8, 1_000_000).fits and run(4, 1_000_000).fits
    assert any("sp_size >= 25 at tp_size 2" in w for w in run(2, 1_000_000).warnings)


def test_several_nodes_put_the_sp_ring_on_the_network_and_tp_on_nvlink():
    dep = Deployment(tp_size=8, sp_size=2)  # 2 nodes of 8
    assert (dep.num_nodes, dep.tp_spans_nodes) == (2, False)
    tp_bw, sp_bw = link_bandwidths(H100, dep)
    assert (tp_bw, sp_bw) == (450e9, 50e9)
    p = prefill_breakdown(LLAMA70, H100, dep, K128)
    assert p.ring_comm_step_s == pytest.approx(10e-6 + K128 / 2 * 2 * 1 * 128 * 2 / 50e9)
    wide = Deployment(tp_size=16, sp_size=1)  # a TP group over two nodes
    assert wide.tp_spans_nodes and link_bandwidths(H100, wide) == (50e9, 50e9)
    assert any("span nodes" in w for w in plan(LLAMA70, H100, wide, K4).warnings)
    with pytest.raises(ValueError, match="make tp x sp a multiple of 8"):
        Deployment(tp_size=4, sp_size=3)
    no_network = dataclasses.replace(H100, inter_node_bandwidth=None)
    with pytest.raises(ValueError, match="--inter-node-bw-gbs"):
        plan(LLAMA70, no_network, dep, K4)
    assert plan(LLAMA70, no_network, Deployment(tp_size=8), K4).ttft_s > 0  # one node: unused


def test_launch_lines_run_the_planned_layout():
    one = plan(LLAMA70, H100, Deployment(tp_size=4, sp_size=2, hbm_utilization=0.9), K128,
               model_path="/ckpt/Llama-3.1-70B").launch
    assert (one["world_size"], one["num_nodes"], one["nproc_per_node"]) == (8, 1, 8)
    assert one["flags"] == "--tensor-parallel-size 4 --sp-size 2 --gpu-memory-utilization 0.9"
    assert one["command"] == (
        "torchrun --standalone --nproc-per-node 8 -m sp_serve.cli serve --model "
        "/ckpt/Llama-3.1-70B --tensor-parallel-size 4 --sp-size 2 --gpu-memory-utilization 0.9")
    assert one["recipe"] == ("MODEL=/ckpt/Llama-3.1-70B NGPUS=8 TP=4 bash launch/single_node.sh "
                             "--gpu-memory-utilization 0.9")
    two = plan(LLAMA70, H100, Deployment(tp_size=8, sp_size=2, kv_dtype="fp8"), K128).launch
    assert two["command"] == (
        "torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 --master-addr "
        "$MASTER_ADDR --master-port 29500 -m sp_serve.cli serve --model \"$MODEL\" "
        "--tensor-parallel-size 8 --sp-size 2 --kv-cache-dtype fp8")
    assert "NNODES=2 NODE_RANK=<0..1> NGPUS=8 TP=8 bash launch/multi_node.sh --kv-cache-dtype fp8" \
        in two["recipe"]
    assert any("activations" in n for n in two["notes"])  # hbm_utilization 1.0 vs the engine's


def test_chunked_prefill_attention_adds_up():
    # Chunk 2 attends to chunk 1's cached KV: the causal pairs of the whole prompt split exactly.
    whole = prefill_flops(YI, PAPER, 3000)[1]
    parts = (
        prefill_flops(YI, PAPER, 1000)[1] + prefill_flops(YI, PAPER, 2000, cached_tokens=1000)[1]
    )
    assert close(parts, whole, 1e-12)
    assert prefill_seconds(YI, A100, PAPER, 512, cached_tokens=40_000) > prefill_seconds(
        YI, A100, PAPER, 512
    )
    # A tiny chunk is bound by reading the weights, not by FLOPs.
    tiny = prefill_breakdown(YI, A100, PAPER, 8)
    assert tiny.total_s == tiny.weight_read_s > tiny.compute_s


def test_decode_batch_is_memory_bound_until_large():
    single = decode_step_breakdown(YI, A100, PAPER, [1000])
    assert single.total_s == single.memory_s > single.compute_s
    batch = decode_step_breakdown(YI, A100, PAPER, [1000] * 512)
    assert batch.compute_s > single.compute_s * 500
    assert decode_step_seconds(YI, A100, PAPER, [100, 300]) == decode_step_seconds(
        YI, A100, PAPER, [200, 200]
    )


# --- presets, config loading, validation ----------------------------------------------------


@pytest.mark.parametrize(
    "name, billions",
    [
        ("yi-34b-200k", 34.39),
        ("llama-3.1-8b", 8.03),
        ("llama-3.1-70b", 70.55),
        ("qwen2.5-7b", 7.62),
    ],
)
def test_model_presets_parameter_counts(name, billions):
    assert close(resolve_model(name).num_params / 1e9, billions, 0.005)


def test_load_hf_config_file_and_dir(tmp_path):
    config = {
        "model_type": "llama",
        "num_hidden_layers": 60,
        "hidden_size": 7168,
        "num_attention_heads": 56,
        "num_key_value_heads": 8,
        "intermediate_size": 20480,
        "vocab_size": 64000,
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_dir, from_file = load_hf_config(tmp_path), resolve_model(str(tmp_path / "config.json"))
    for shape in (from_dir, from_file):
        assert shape.num_params == YI.num_params and shape.head_dim == 128
    qwen = {**config, "model_type": "qwen2"}
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    assert load_hf_config(tmp_path).qkv_bias
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        load_hf_config(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_config(tmp_path / "missing")


def test_validation_errors_say_what_to_change():
    with pytest.raises(ValueError, match=r"a100-80g.*h100-sxm.*h200"):
        get_hardware("v100")
    with pytest.raises(ValueError, match=r"unknown model 'gpt-5'.*llama-3.1-8b.*config.json"):
        resolve_model("gpt-5")
    with pytest.raises(ValueError, match="peak_flops must be a positive"):
        Hardware("bad", 0, 80 * GIB, 2e12, 300e9, 32e9)
    with pytest.raises(ValueError, match="sp_size must be an int >= 1"):
        Deployment(sp_size=0)
    with pytest.raises(ValueError, match="flops_efficiency must be in"):
        Deployment(flops_efficiency=0)
    with pytest.raises(ValueError, match="kv_dtype='int3'"):
        Deployment(kv_dtype="int3")
    with pytest.raises(ValueError, match="context_len must be an int >= 1"):
        plan(YI, A100, PAPER, 0)
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        ModelShape("bad", 0, 8, 1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="batch_context_lens"):
        decode_step_seconds(YI, A100, PAPER, [])
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("85.9GB") == 85.9e9
    with pytest.raises(ValueError, match="GiB"):
        parse_bytes("80 gigs")


# --- the command ---------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_json_keys(capsys):
    assert cli.run(_args("--json", "--context-len", "4096", "-sp", "2")) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "kv_bytes_per_token",
        "kv_bytes_per_request",
        "kv_bytes_per_request_per_rank",
        "max_concurrency",
        "max_context_tokens",
        "prefill",
        "decode_first_step",
        "decode_step_s",
        "ttft_s",
        "e2e_s",
        "context_switch_s",
        "context_switch_round_trip_s",
        "assumptions",
        "warnings",
    ):
        assert key in out
    assert {"ring_comm_step_s", "ring_compute_step_s", "ring_hidden", "total_s"} <= set(
        out["prefill"]
    )
    assert any("GiB" in line for line in out["assumptions"])
    assert any("theoretical peak" in line for line in out["assumptions"])


def test_cli_table_and_custom_hardware(capsys):
    assert cli.run(_args("--context-len", "4096")) == 0
    out = capsys.readouterr().out
    assert "prefill time" in out and "assumptions" in out
    assert cli.run(_args("--hardware", "custom", "--peak-tflops", "100")) == 2
    assert "--hbm-bw-gbs" in capsys.readouterr().err
    custom = (
        "--hardware",
        "custom",
        "--peak-tflops",
        "312",
        "--hbm",
        "80GiB",
        "--hbm-bw-gbs",
        "2039",
        "--interconnect-bw-gbs",
        "300",
        "--pcie-bw-gbs",
        "32",
        "--json",
    )
    assert cli.run(_args(*custom)) == 0
    assert json.loads(capsys.readouterr().out)["max_concurrency"] == 1
    assert cli.run(_args("--hardware", "h200", "--hbm", "100GB", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["hardware"] == "h200 (modified)"


def test_cli_tp_aliases_compare_layouts_and_print_launches(capsys, tmp_path):
    for flag in ("--tp-size", "--tensor-parallel-size", "-tp"):
        assert _args(flag, "4", "2").tp_size == [4, 2]
    base = ("--model", "llama-3.1-70b", "--hardware", "h100-sxm", "--context-len", "131072",
            "--hbm-utilization", "0.9")
    assert cli.run(_args(*base, "--num-gpus", "8", "-tp", "8", "4", "2", "-sp", "1", "2", "4",
                         "--json")) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert [(p["tp_size"], p["sp_size"]) for p in plans] == [(8, 1), (4, 2), (2, 4)]
    assert [p["launch"]["flags"].split()[:4] for p in plans] == [
        ["--tensor-parallel-size", str(t), "--sp-size", str(8 // t)] for t in (8, 4, 2)]
    assert all(p["memory_per_gpu_bytes"] > p["weight_bytes_per_rank"] for p in plans)
    assert [p["fits"] for p in plans] == [True, True, True]  # TP 2: 75.9 of 77.3 GB

    assert cli.run(_args(*base, "--num-gpus", "8", "-tp", "8", "4", "-sp", "1", "2")) == 0
    out = capsys.readouterr().out
    assert "TP 8 x SP 1" in out and "TP 4 x SP 2" in out and "TP 8 x SP 2" not in out
    assert "memory per GPU" in out and "TTFT" in out and "TBT" in out
    assert ("torchrun --standalone --nproc-per-node 8 -m sp_serve.cli serve --model \"$MODEL\" "
            "--tensor-parallel-size 4 --sp-size 2") in out

    # One layout: the full table with its launch; a checkpoint path is named in the lines.
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
        "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256}))
    assert cli.run(_args("--model", str(tmp_path / "config.json"), "--hardware", "h100-sxm",
                         "-tp", "8", "-sp", "2", "--context-len", "1000000")) == 0
    out = capsys.readouterr().out
    assert "memory per GPU" in out and "prefill time (TTFT)" in out
    assert (f"torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 --master-addr "
            f"$MASTER_ADDR --master-port 29500 -m sp_serve.cli serve --model {tmp_path} "
            "--tensor-parallel-size 8 --sp-size 2") in out
    assert "launch/multi_node.sh" in out


def test_cli_bad_layouts_say_what_to_change(capsys):
    assert cli.run(_args("--model", "llama-3.1-70b", "-tp", "3")) == 2
    assert "use one of 1, 2, 4, 8, 16, 32, 64" in capsys.readouterr().err
    assert cli.run(_args("-tp", "8", "-sp", "1", "2", "--num-gpus", "4")) == 2
    assert "combination uses --num-gpus 4" in capsys.readouterr().err
    assert cli.run(_args("--model", "llama-3.1-70b", "-tp", "4", "-sp", "3")) == 2
    assert "multiple of 8" in capsys.readouterr().err
    custom = ("--hardware", "custom", "--peak-tflops", "312", "--hbm", "80GiB", "--hbm-bw-gbs",
              "2039", "--interconnect-bw-gbs", "300", "--pcie-bw-gbs", "32")
    assert cli.run(_args(*custom, "--model", "llama-3.1-70b", "-tp", "8", "-sp", "2")) == 2
    assert "--inter-node-bw-gbs" in capsys.readouterr().err
    assert cli.run(_args(*custom, "--inter-node-bw-gbs", "25", "--model", "llama-3.1-70b",
                         "-tp", "8", "-sp", "2", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["num_nodes"] == 2
