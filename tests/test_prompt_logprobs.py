"""Prompt logprobs (vLLM's `prompt_logprobs`) against transformers' log-softmax.

Each rank scores its own zigzag share of every prompt chunk in vocabulary chunks; rank 0 gets
only the chosen tokens' logprobs, ranks and top-k. At SP 1, 2 and 3, on prompts of length 1,
2N-1, 2N+1, a prime and one longer than a step (so it is prefilled in several chunks, the
chunk boundaries falling anywhere in the zigzag), every position equals
log_softmax(HF logits) in float32 to 1e-4, the rank is the count of likelier tokens + 1, and
the top-k are HF's top-k.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sp_serve.engine.prompt_logprobs import token_logprobs
from sp_serve.engine.sampling import SamplingParams

K = 3
TOL = 1e-4


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _hf_logprobs(ckpt, prompt: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)


def test_vocab_chunked_kernel_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(300, 16, generator=g), torch.randn(1000, 16, generator=g)
    targets = torch.randint(0, 1000, (300,), generator=g)
    out = token_logprobs(h, w, targets, 5, row_block=64, vocab_chunk=97)  # ragged blocks
    ref = torch.log_softmax(h @ w.T, -1)
    chosen = ref.gather(1, targets[:, None])[:, 0]
    assert torch.allclose(out[:, 0], chosen, atol=1e-5)
    assert torch.equal(out[:, 1].long(), (ref > chosen[:, None]).sum(-1) + 1)
    values, ids = ref.topk(5)
    assert torch.allclose(out[:, 2:7], values, atol=1e-5)
    assert torch.equal(out[:, 7:].long(), ids)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_prompt_logprobs_match_hf(hf_checkpoint, world):
    from sp_serve import LLM
    from sp_serve.model.spec import load_spec

    ckpt = str(hf_checkpoint("llama-gqa"))
    vocab = load_spec(ckpt).vocab_size
    lengths = [1, 2 * world - 1, 2 * world + 1, 131, 300]  # 300 > a step: chunked (64 + ...)
    prompts = [_prompt(n, seed=n, vocab=vocab) for n in lengths]
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=K, ignore_eos=True)
    with LLM(ckpt, sp_size=world, scheduler="fcfs", max_num_batched_tokens=64, cpu_threads=1,
             dist_timeout_s=60) as llm:
        outs = llm.generate(prompts, params)
        # a second request without prompt logprobs gets none (and its chunks cost nothing extra)
        plain = llm.generate([prompts[3]], SamplingParams(max_tokens=1, temperature=0))
    assert plain[0].prompt_logprobs is None
    for prompt, out in zip(prompts, outs):
        ref = _hf_logprobs(ckpt, prompt)
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for p in range(1, len(prompt)):
            entry, row = got[p], ref[p - 1]
            token = prompt[p]
            assert token in entry
            assert abs(entry[token].logprob - float(row[token])) < TOL, (len(prompt), p)
            ranked = row.sort(descending=True).values
            assert entry[token].rank == int((row > row[token]).sum()) + 1 or \
                abs(float(ranked[entry[token].rank - 1]) - float(row[token])) < TOL  # a near tie
            values, ids = row.topk(K)
            tops = {t: lp for t, lp in entry.items() if t != token or lp.rank <= K}
            for t, v in zip(ids.tolist(), values.tolist()):
                if t in tops:
                    assert abs(tops[t].logprob - v) < TOL
                else:  # a near tie at the k-th place may pick the other token
                    assert abs(v - float(values[-1])) < TOL, (len(prompt), p, t)
