"""GGUF files: sp-serve's conversion against transformers' own GGUF load of the same file.

Tiny GGUF files are written here as llama.cpp writes them (tests/gguf_files.py); each is
converted into the cache ($SP_SERVE_CACHE, a temporary directory here) and loaded by sp-serve's
loader, and its logits are compared with transformers' `from_pretrained(gguf_file=...)` and,
for float32 storage, with the original HF model the file was written from. The real SmolLM2
file is converted in tests/test_real_model.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sp_serve.model import load_model, load_tokenizer
from sp_serve.model.gguf import gguf_checkpoint, read_gguf_info
from tests.gguf_files import hf_gguf_logits, write_gguf
from tests.test_model import causal_attention

IDS = [5, 9, 200, 17, 33, 101, 7, 250, 64, 3, 120]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SP_SERVE_CACHE", str(tmp_path / "cache"))


def _our_logits(ckpt) -> torch.Tensor:
    model, spec = load_model(ckpt, dtype=torch.float32)
    n = len(IDS)
    with torch.no_grad():
        hidden = model(torch.tensor(IDS), torch.arange(n), causal_attention(spec, n))
        return model.compute_logits(hidden)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch, storage, overrides", [
    ("llama", "F32", {}),
    ("llama", "Q8_0", {"num_key_value_heads": 1}),  # MQA: k rows un-permuted per KV head
    ("qwen2", "F16", {"tie_word_embeddings": True}),  # q/k/v biases, no permutation, tied head
])
def test_conversion_matches_transformers_gguf_load(tmp_path, arch, storage, overrides):
    path, original = write_gguf(tmp_path / f"{arch}.gguf", arch, storage=storage, **overrides)
    ckpt = gguf_checkpoint(path)
    ours = _our_logits(ckpt)
    ref = hf_gguf_logits(path, IDS)
    assert _rel(ours, ref) < 1e-5, (arch, storage)
    if storage == "F32":  # lossless: the very model the file was written from
        with torch.no_grad():
            assert _rel(ours, original(torch.tensor([IDS])).logits[0]) < 1e-5
    config = json.loads((ckpt / "config.json").read_text())
    assert config["dtype"] == {"F16": "float16"}.get(storage, "float32")  # exact, not rounded
    assert "quantization_config" not in config
    # the tokenizer and chat template come along, and tokenize as transformers' GGUF load does
    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = load_tokenizer(ckpt)
    text = "<|im_start|>user\nthe cat sat<|im_end|>"
    assert tok.encode(text) == theirs.encode(text) and tok.chat_template == theirs.chat_template


def test_cache_is_reused_and_redone_when_the_file_changes(tmp_path):
    path, _ = write_gguf(tmp_path / "m.gguf", seed=0)
    first = gguf_checkpoint(path)
    weights = first / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert gguf_checkpoint(str(path)) == first and weights.stat().st_mtime_ns == mtime
    before = _our_logits(first)
    write_gguf(path, seed=1)  # same path, other weights
    assert gguf_checkpoint(path) == first
    assert not torch.equal(_our_logits(first), before)
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporaries


def test_bad_files_are_clear_errors(tmp_path):
    other, _ = write_gguf(tmp_path / "gemma.gguf", gguf_arch="gemma2", with_tokenizer=False)
    with pytest.raises(ValueError, match="architecture 'gemma2' is not supported; sp-serve runs llama"):
        read_gguf_info(other)
    good, _ = write_gguf(tmp_path / "good.gguf")
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        gguf_checkpoint(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_checkpoint(tmp_path / "junk.gguf")
    with pytest.raises(ValueError, match="not found"):
        gguf_checkpoint(tmp_path / "missing.gguf")
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def _cli(args, cache, timeout=240):
    env = dict(os.environ, SP_SERVE_CACHE=str(cache), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sp_serve.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_generate_from_a_gguf_file_at_sp2_with_a_tokenizer_override(tmp_path, tiny_model_dir):
    """--model x.gguf (a file without a tokenizer) --tokenizer DIR: same greedy tokens as
    transformers' GGUF load; the tokenizer override tokenizes the text prompt."""
    path, _ = write_gguf(tmp_path / "notok.gguf", with_tokenizer=False)
    r = _cli(["generate", "--model", str(path), "--tokenizer", str(tiny_model_dir), "-sp", "2",
              "--prompt", "the cat sat on the mat", "--max-tokens", "6", "--temperature", "0",
              "--ignore-eos", "--json", "--scheduler", "fcfs"], tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ids = load_tokenizer(tiny_model_dir).encode("the cat sat on the mat")
    assert out["prompt_token_ids"] == ids
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert out["output_token_ids"] == ref[0, len(ids):].tolist()


def test_cli_bad_gguf_is_one_line_exit_2(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    r = _cli(["generate", "--model", str(tmp_path / "junk.gguf"), "--prompt", "hi"], tmp_path / "cache")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("sp-serve: error: ")
    assert "Traceback" not in r.stderr and "truncated or corrupt" in r.stderr
