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
    kv_heads_per_rank,
    load_hf_config,
    plan,
    prefill_breakdown,
    prefill_flops,
    prefill_seconds,
    resolve_model,
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


def test_tp_shards_weights_and_kv_heads():
    one, two = plan(YI, A100, Deployment(), K4), plan(YI, A100, Deployment(tp_size=2), K4)
    assert two.weight_bytes_per_rank == one.weight_bytes_per_rank / 2
    assert two.kv_bytes_per_request_per_rank == one.kv_bytes_per_request_per_rank / 2
    assert two.prefill.tp_comm_s > 0 and one.prefill.tp_comm_s == 0
    llama70 = MODEL_PRESETS["llama-3.1-70b"]
    assert kv_heads_per_rank(llama70, Deployment(tp_size=16)) == 1  # 8 KV heads replicated
    with pytest.raises(ValueError, match="tp_size=3 must divide num_heads"):
        kv_heads_per_rank(llama70, Deployment(tp_size=3))


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
