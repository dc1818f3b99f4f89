"""The sequence-parallel engine path against Hugging Face transformers, on real processes.

For SP = 1..4 and every checkpoint shape (GQA/MHA/MQA, qkv bias, tied embeddings, each RoPE
scaling and both config spellings): last-prompt-token logits within 1e-4 relative (float32)
and identical greedy tokens, for prompt lengths 1, 2N-1, a prime (307) and one longer than the
RoPE original_max_position_embeddings; plus the prime prompt prefilled in two chunks (the
second attends to the first's sharded KV in place).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.checkpoints import CHECKPOINT_CASES, write_hf_checkpoint
from tests.dist_util import run_on_ranks
from tests.sp_jobs import engine_jobs

NUM_DECODE = 4
PRIME = 307


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp_hf")
    return {name: str(write_hf_checkpoint(root / name, **kwargs)) for name, kwargs in CHECKPOINT_CASES}


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


# HF's answer per (checkpoint, prompt), computed once for the module: the SP sizes and the
# chunked case ask for the same prompts (lengths 1 and 307 at every SP size).
_HF_CACHE: dict[tuple[str, tuple[int, ...]], tuple[torch.Tensor, list[int]]] = {}


def _hf_reference(ckpt: str, prompt: list[int]):
    key = (ckpt, tuple(prompt))
    if key not in _HF_CACHE:
        _HF_CACHE[key] = _hf_compute(ckpt, prompt)
    return _HF_CACHE[key]


def _hf_compute(ckpt: str, prompt: list[int]):
    # A fresh model per prompt: HF's dynamic RoPE keeps state across calls.
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logits = model(ids).logits[0, -1].float()
        out = model.generate(ids, max_new_tokens=NUM_DECODE, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(ids))
    return logits, out[0, len(prompt):].tolist()


def _jobs(checkpoints, world):
    jobs = []
    for name, ckpt in checkpoints.items():
        for n in sorted({1, 2 * world - 1, PRIME}):
            jobs.append((name, ckpt, n, None))
        jobs.append((name, ckpt, PRIME, 100))  # chunked: 100 tokens, then 207 over them
    return jobs


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_engine_matches_hf(checkpoints, world):
    from sp_serve.model.spec import load_spec
    jobs, refs = [], []
    for name, ckpt, n, split in _jobs(checkpoints, world):
        spec = load_spec(ckpt)
        prompt = _prompt(n, seed=n, vocab=spec.vocab_size)
        jobs.append((ckpt, prompt, NUM_DECODE, split))
        refs.append((name, n, split, *_hf_reference(ckpt, prompt)))
    results = run_on_ranks(world, engine_jobs, jobs)
    failures = []
    for (name, n, split, ref_logits, ref_tokens), (logits, tokens, per_rank) in zip(refs, results):
        rel = float((logits - ref_logits).norm() / ref_logits.norm())
        if rel > 1e-4 or tokens != ref_tokens:
            failures.append(f"{name} n={n} split={split}: rel={rel:.2e} tokens={tokens} hf={ref_tokens}")
        # the KV stays where it was computed: shards within one block-free token of even
        assert sum(per_rank) == n + NUM_DECODE - 1
        assert max(per_rank) - min(per_rank) <= (1 if split is None else 2), (name, n, per_rank)
    assert not failures, "\n".join(failures)


def test_prompts_exceed_original_rope_context(checkpoints):
    """The prime prompt is longer than every scaled case's original_max_position_embeddings."""
    import json
    from pathlib import Path
    scaled = 0
    for ckpt in checkpoints.values():
        cfg = json.loads((Path(ckpt) / "config.json").read_text())
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        original = rope.get("original_max_position_embeddings") or (
            cfg["max_position_embeddings"] if rope.get("rope_type", rope.get("type")) == "dynamic" else None)
        if original:
            scaled += 1
            assert PRIME > original
    assert scaled >= 4


MIXED_CASES = ["llama-gqa", "qwen2-bias-tied", "llama-dynamic-scaling", "llama-mqa-bias"]
MIXED_LENS, MIXED_SPLITS = (PRIME, 53, 129), [[100, 201], [], [1, 2, 70]]


@pytest.fixture(scope="module")
def mixed_refs(checkpoints):
    """The mixed-step prompts of every case and HF's answers for them, computed once."""
    from sp_serve.model.spec import load_spec
    refs = {}
    for name in MIXED_CASES:
        vocab = load_spec(checkpoints[name]).vocab_size
        prompts = [_prompt(n, seed=n + 7, vocab=vocab) for n in MIXED_LENS]
        refs[name] = (prompts, [_hf_reference(checkpoints[name], p) for p in prompts])
    return refs


@pytest.mark.parametrize("world,cpu_comm", [(1, "auto"), (2, "shm"), (2, "gloo"), (3, "shm"), (4, "shm")])
def test_steps_carrying_chunks_and_decodes_match_hf(checkpoints, mixed_refs, world, cpu_comm):
    """Three sequences in the same steps, as the schedulers run them: prompts of 307, 53 and 129
    tokens chunked at awkward places (a 1-token chunk, chunks shorter than 2N, boundaries not
    on a block), several chunks per step, and the sequences whose prompts are done decoding in
    those same steps. Each sequence's first-token logits and greedy tokens equal HF's."""
    from tests.sp_jobs import mixed_step_jobs
    jobs = [(checkpoints[name], mixed_refs[name][0]) for name in MIXED_CASES]
    results = run_on_ranks(world, mixed_step_jobs, jobs, MIXED_SPLITS, NUM_DECODE, cpu_comm=cpu_comm)
    failures = []
    for name, per_seq in zip(MIXED_CASES, results):
        prompts, refs = mixed_refs[name]
        for prompt, (logits, tokens), (ref_logits, ref_tokens) in zip(prompts, per_seq, refs):
            rel = float((logits - ref_logits).norm() / ref_logits.norm())
            if rel > 1e-4 or tokens != ref_tokens:
                failures.append(f"{name} n={len(prompt)}: rel={rel:.2e} tokens={tokens} hf={ref_tokens}")
    assert not failures, "\n".join(failures)
