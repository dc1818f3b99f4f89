"""sp_serve.model against Hugging Face transformers on the same checkpoint files.

Every case in tests.checkpoints.CHECKPOINT_CASES is loaded twice, by our loader and by
AutoModelForCausalLM (float32), and compared on hidden states and logits. Our model gets a plain
torch SDPA causal attention callable. Shape legend: t tokens, h heads, d head_dim, v vocab.
"""
from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sp_serve.model import CausalLM, ModelSpec, load_model, load_spec, load_tokenizer
from sp_serve.model.tiny import (
    SPECIAL_TOKENS,
    TINY_DEFAULT,
    cached_tiny_model,
    default_model_dir,
    make_tiny_model,
)
from tests.checkpoints import CHECKPOINT_CASES, write_hf_checkpoint

CASE_NAMES = [name for name, _ in CHECKPOINT_CASES]
LENGTHS = (1, 307)  # 307: prime, past every scaled case's pretraining length (64)
REL_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Other engineers share this 2-core machine; also makes timings stable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def masked_attention(spec: ModelSpec, seq_t: torch.Tensor, pos_t: torch.Tensor):
    """Reference attention over flat tokens: token i sees token j iff same sequence and
    pos_j <= pos_i. Works for any token order (dense t x t mask; fine at test sizes)."""
    mask_tt = (seq_t[:, None] == seq_t[None, :]) & (pos_t[None, :] <= pos_t[:, None])

    def attn(layer: int, q_thd, k_thd, v_thd):
        o_1htd = F.scaled_dot_product_attention(
            q_thd.transpose(0, 1)[None], k_thd.transpose(0, 1)[None], v_thd.transpose(0, 1)[None],
            attn_mask=mask_tt, scale=spec.softmax_scale, enable_gqa=True)
        return o_1htd[0].transpose(0, 1)

    return attn


def causal_attention(spec: ModelSpec, t: int):
    return masked_attention(spec, torch.zeros(t, dtype=torch.long), torch.arange(t))


class CachingAttention:
    """One sequence, KV cache grown per call: new queries are the last positions."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, q_thd, k_thd, v_thd):
        if layer in self.k:
            k_thd = torch.cat([self.k[layer], k_thd])
            v_thd = torch.cat([self.v[layer], v_thd])
        self.k[layer], self.v[layer] = k_thd, v_thd
        t, total = q_thd.shape[0], k_thd.shape[0]
        mask_tt = torch.arange(total)[None, :] <= torch.arange(total - t, total)[:, None]
        o = F.scaled_dot_product_attention(
            q_thd.transpose(0, 1)[None], k_thd.transpose(0, 1)[None], v_thd.transpose(0, 1)[None],
            attn_mask=mask_tt, scale=self.spec.softmax_scale, enable_gqa=True)
        return o[0].transpose(0, 1)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prompt(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- logits and hidden vs HF


@pytest.mark.parametrize("name", CASE_NAMES)
def test_matches_hf(name, hf_checkpoint):
    path = hf_checkpoint(name)
    model, spec = load_model(path)
    hf = hf_model(path)
    # Ascending lengths: HF's dynamic RoPE keeps the frequencies of the longest sequence seen
    # until a sequence shorter than max_position_embeddings comes (its cache is stateful).
    for n in LENGTHS:
        ids_t = prompt(n, spec.vocab_size)
        hidden_td = model(ids_t, torch.arange(n), causal_attention(spec, n))
        logits_v = model.compute_logits(hidden_td[-1:])[0]
        with torch.no_grad():
            ref_hidden = hf.model(ids_t[None]).last_hidden_state[0]
            ref_logits = hf(ids_t[None]).logits[0, -1]
        assert logits_v.dtype == torch.float32 and logits_v.shape == (spec.vocab_size,)
        assert rel_err(hidden_td, ref_hidden) < REL_TOL, (name, n)
        assert rel_err(logits_v, ref_logits) < REL_TOL, (name, n)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-dynamic-params", "llama3-scaling"])
def test_packed_shuffled_sequences(name, hf_checkpoint):
    """Two sequences in one flat forward, tokens in random order: each must match HF run on
    that sequence alone (exercises global positions and per-token dynamic rope_len)."""
    path = hf_checkpoint(name)
    model, spec = load_model(path)
    lengths = (97, 131)
    ids = [prompt(n, spec.vocab_size, seed=n) for n in lengths]
    seq_t = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    pos_t = torch.cat([torch.arange(n) for n in lengths])
    rope_len_t = torch.cat([torch.full((n,), n) for n in lengths])
    perm_t = torch.randperm(len(seq_t), generator=torch.Generator().manual_seed(0))
    hidden_td = model(torch.cat(ids)[perm_t], pos_t[perm_t],
                      masked_attention(spec, seq_t[perm_t], pos_t[perm_t]), rope_len_t[perm_t])
    for i, n in enumerate(lengths):
        with torch.no_grad():
            ref = hf_model(path).model(ids[i][None]).last_hidden_state[0]  # fresh: dynamic state
        ours = hidden_td[seq_t[perm_t] == i][pos_t[perm_t][seq_t[perm_t] == i].argsort()]
        assert rel_err(ours, ref) < REL_TOL, (name, n)


@pytest.mark.parametrize("name", ["llama-dynamic-scaling", "llama-yarn-params"])
def test_incremental_decode_matches_hf_generate(name, hf_checkpoint):
    """Prefill past the scaling threshold, then decode one token at a time with a KV cache;
    for dynamic NTK each step's token rotates with rope_len = its position + 1, as HF does."""
    path = hf_checkpoint(name)
    model, spec = load_model(path)
    n, steps = 100, 8
    ids_t = prompt(n, spec.vocab_size)
    with torch.no_grad():
        ref = hf_model(path).generate(ids_t[None], max_new_tokens=steps, do_sample=False,
                                      min_new_tokens=steps, pad_token_id=0)[0, n:].tolist()
    attn = CachingAttention(spec)
    hidden_td = model(ids_t, torch.arange(n), attn, torch.full((n,), n))
    ours = []
    for step in range(steps):
        logits_v = model.compute_logits(hidden_td[-1:])[0]
        top2 = logits_v.topk(2).values
        assert top2[0] - top2[1] > 1e-3, "margin too thin for a robust greedy comparison"
        ours.append(int(logits_v.argmax()))
        pos = n + step
        hidden_td = model(torch.tensor([ours[-1]]), torch.tensor([pos]), attn,
                          torch.tensor([pos + 1]))
    assert ours == ref


ROPE_CASES = ["llama-gqa", "llama-linear-scaling", "llama-dynamic-scaling", "llama-yarn-params",
              "llama3-params-head-dim"]


@pytest.mark.parametrize("name", ROPE_CASES)
def test_rope_on_zigzag_subset_matches_hf(name, hf_checkpoint):
    """RotaryEmbedding.apply on the tokens one rank holds under zigzag (2 of 4 chunks) equals
    HF's rotary embedding of the whole sequence, sliced."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from sp_serve.model import RotaryEmbedding

    path = hf_checkpoint(name)
    spec = load_spec(path)
    n, chunk = 300, 75
    gen = torch.Generator().manual_seed(0)
    q_thd = torch.randn(n, spec.num_heads, spec.head_dim, generator=gen)
    k_thd = torch.randn(n, spec.num_kv_heads, spec.head_dim, generator=gen)
    cos, sin = LlamaRotaryEmbedding(AutoConfig.from_pretrained(path))(q_thd, torch.arange(n)[None])
    ref_q, ref_k = apply_rotary_pos_emb(q_thd.transpose(0, 1)[None], k_thd.transpose(0, 1)[None],
                                        cos, sin)
    local_t = torch.cat([torch.arange(chunk), torch.arange(3 * chunk, 4 * chunk)])
    q_rot, k_rot = RotaryEmbedding(spec).apply(q_thd[local_t], k_thd[local_t], local_t,
                                               torch.full((len(local_t),), n))
    torch.testing.assert_close(q_rot, ref_q[0].transpose(0, 1)[local_t], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_rot, ref_k[0].transpose(0, 1)[local_t], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-dynamic-scaling"])
def test_forward_with_no_tokens(name, hf_checkpoint):
    """A rank can hold no tokens of a short prompt; the model must pass zero rows through."""
    model, spec = load_model(hf_checkpoint(name))
    empty_t = torch.zeros(0, dtype=torch.long)

    def attn(layer, q_thd, k_thd, v_thd):
        return torch.zeros_like(q_thd)

    assert model(empty_t, empty_t, attn, empty_t).shape == (0, spec.hidden_size)


def test_bfloat16_load_runs_close_to_float32(hf_checkpoint):
    path = hf_checkpoint("llama-gqa")
    model32, _ = load_model(path)
    model16, spec16 = load_model(path, dtype=torch.bfloat16)
    assert spec16.dtype == model16.dtype == torch.bfloat16
    ids_t = prompt(33, spec16.vocab_size)
    a = model32.compute_logits(model32(ids_t, torch.arange(33), causal_attention(spec16, 33)))
    b = model16.compute_logits(model16(ids_t, torch.arange(33), causal_attention(spec16, 33)))
    assert b.dtype == torch.float32
    assert rel_err(b, a) < 0.1


# ---------------------------------------------------------------- spec parsing


def test_spec_fields(hf_checkpoint):
    gqa = load_spec(hf_checkpoint("llama-gqa"))
    assert (gqa.architecture, gqa.num_heads, gqa.num_kv_heads, gqa.head_dim) == (
        "LlamaForCausalLM", 4, 2, 16)
    assert gqa.softmax_scale == pytest.approx(16 ** -0.5)
    assert (gqa.rope_type, gqa.rope_theta, gqa.dtype) == ("default", 10000.0, torch.float32)
    assert gqa.eos_token_ids == (TINY_DEFAULT["vocab_size"] - 3,)
    assert load_spec(hf_checkpoint("mistral-head-dim")).head_dim == 32
    qwen = load_spec(hf_checkpoint("qwen2-bias-tied"))
    assert qwen.qkv_bias and not qwen.o_bias and qwen.tie_word_embeddings
    llama_bias = load_spec(hf_checkpoint("llama-mqa-bias"))
    assert llama_bias.qkv_bias and llama_bias.o_bias and llama_bias.num_kv_heads == 1
    llama3 = load_spec(hf_checkpoint("llama3-scaling"))
    assert (llama3.rope_type, llama3.rope_theta) == ("llama3", 500000.0)
    assert llama3.rope_parameters_dict["original_max_position_embeddings"] == 64
    linear = load_spec(hf_checkpoint("llama-linear-scaling"))  # old "type" key
    assert (linear.rope_type, linear.rope_parameters_dict["factor"]) == ("linear", 2.0)
    for name in CASE_NAMES:
        assert load_spec(hf_checkpoint(name)).max_model_len >= 512, name
    hash(gqa)  # frozen and hashable: broadcast to ranks, used as a cache key


def test_spec_reads_generation_config_and_dtype(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint("llama-gqa"), tmp_path / "c")
    edit_json(path / "config.json", dtype="bfloat16", eos_token_id=[5, 6])
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [6, 7]}))
    spec = load_spec(path)
    assert spec.dtype == torch.bfloat16 and spec.eos_token_ids == (5, 6, 7)


# ---------------------------------------------------------------- bad input


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def test_missing_config(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        load_spec(tmp_path)


def test_corrupt_config_json(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint("llama-gqa"), tmp_path / "c")
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ValueError, match="not a readable JSON"):
        load_model(path)


def test_unknown_architecture(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint("llama-gqa"), tmp_path / "c")
    edit_json(path / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM"):
        load_spec(path)


def test_missing_weights(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint("llama-gqa"), tmp_path / "c")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights found"):
        load_spec(path)
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="convert it to safetensors"):
        load_model(path)


def test_truncated_safetensors(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint("llama-gqa"), tmp_path / "c")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file"):
        load_model(path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(path)


def test_missing_tensor_and_shard(tmp_path, hf_checkpoint):
    from safetensors.torch import load_file, save_file

    path = copy_checkpoint(hf_checkpoint("llama-gqa"), tmp_path / "c")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        load_model(path)

    sharded = copy_checkpoint(hf_checkpoint("llama-sharded"), tmp_path / "s")
    shard = sorted(sharded.glob("model-0000*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"{shard.name} is named in model.safetensors.index.json"):
        load_model(sharded)


def test_wrong_tensor_shape(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint("llama-gqa"), tmp_path / "c")
    edit_json(path / "config.json", intermediate_size=96)
    with pytest.raises(ValueError, match="gate_proj.weight has shape .* implies"):
        load_model(path)


def test_sliding_window_refused(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint("mistral-head-dim"), tmp_path / "m")
    edit_json(path / "config.json", sliding_window=32)
    with pytest.raises(ValueError, match="sliding-window attention .* not supported"):
        load_spec(path)
    qwen = copy_checkpoint(hf_checkpoint("qwen2-bias-tied"), tmp_path / "q")
    edit_json(qwen / "config.json", use_sliding_window=True, sliding_window=32,
              max_window_layers=0, layer_types=None)
    with pytest.raises(ValueError, match="use_sliding_window false"):
        load_spec(qwen)
    # A window no shorter than the context is plain causal attention: accepted.
    edit_json(path / "config.json", sliding_window=4096)
    assert load_spec(path).sliding_window == 4096


def test_unsupported_rope_type(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint("llama-gqa"), tmp_path / "c")
    half = TINY_DEFAULT["hidden_size"] // TINY_DEFAULT["num_attention_heads"] // 2
    edit_json(path / "config.json", rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * half,
        "long_factor": [2.0] * half, "original_max_position_embeddings": 64})
    with pytest.raises(ValueError, match="'longrope' is not supported; use one of default, linear"):
        load_spec(path)


# ---------------------------------------------------------------- tiny model


def test_tiny_tokenizer_and_chat_template(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    spec = load_spec(tiny_model_dir)
    assert len(tok) == spec.vocab_size == TINY_DEFAULT["vocab_size"]
    text = "Hello, the wörld! 你好 <|im_end|>\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert len(ids) < len(text.encode())  # merges apply
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert set(spec.eos_token_ids) == {tok.eos_token_id, im_end}
    assert spec.bos_token_id == tok.bos_token_id == tok.convert_tokens_to_ids("<s>")
    assert "chat_template" in json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert load_tokenizer(tiny_model_dir.parent) is None  # no tokenizer files there
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)


def test_tiny_greedy_margins_are_clear(tiny_model_dir):
    model, spec = load_model(tiny_model_dir)
    n = 64
    ids_t = prompt(n, spec.vocab_size, seed=3)
    logits_tv = model.compute_logits(model(ids_t, torch.arange(n), causal_attention(spec, n)))
    top2_t2 = logits_tv.topk(2, dim=-1).values
    gap_t = top2_t2[:, 0] - top2_t2[:, 1]
    # fp32 implementations differ by ~1e-5 in these logits; the gaps are orders larger
    assert gap_t.median() > 0.5 and gap_t.min() > 1e-3
    assert logits_tv.std(-1).mean() > 4.0  # far from uniform


def test_tiny_same_seed_same_bytes(tmp_path, tiny_model_dir):
    again = make_tiny_model(tmp_path / "again", arch="llama", seed=0)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert filecmp.cmp(again / name, tiny_model_dir / name, shallow=False), name
    other = make_tiny_model(tmp_path / "other", arch="llama", seed=1)
    assert not filecmp.cmp(other / "model.safetensors", again / "model.safetensors",
                           shallow=False)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_tiny_other_arches_load(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch=arch)
    model, spec = load_model(path)
    assert isinstance(model, CausalLM) and spec.architecture.lower().startswith(arch)
    assert len(load_tokenizer(path)) == spec.vocab_size


def test_default_model_dir_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SP_SERVE_CACHE", str(tmp_path))
    first = default_model_dir()
    assert first == tmp_path / "tiny-llama" and (first / "model.safetensors").is_file()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    load_model(first)
    # Other arguments for the same directory: remade with them (no stale checkpoint).
    again = cached_tiny_model(first, arch="llama", seed=0, num_hidden_layers=1)
    assert again == first and json.loads((first / "config.json").read_text())["num_hidden_layers"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    # Defaults are part of the stamp: spelling one out does not rebuild.
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    cached_tiny_model(first, seed=0, num_hidden_layers=1)
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    # A directory that is not such a cache is left alone.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a cached tiny model"):
        cached_tiny_model(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_write_hf_checkpoint_spellings(tmp_path):
    scaling = write_hf_checkpoint(tmp_path / "a", spelling="rope_scaling",
                                  rope={"rope_type": "linear", "factor": 2.0})
    config = json.loads((scaling / "config.json").read_text())
    assert "rope_parameters" not in config and config["rope_scaling"]["type"] == "linear"
    assert config["rope_theta"] == 10000.0 and config["torch_dtype"] == "float32"
    params = write_hf_checkpoint(tmp_path / "b", rope={"rope_type": "linear", "factor": 2.0})
    assert json.loads((params / "config.json").read_text())["rope_parameters"]["factor"] == 2.0
    assert load_spec(scaling).rope_parameters == load_spec(params).rope_parameters
