"""Prefix caching through the real engine (`LLM`, real rank processes) against Hugging Face
transformers on the same checkpoints: greedy tokens with cache hits equal HF's (which computes
every prompt whole), at SP 1, 2 and 3, for hits that end mid-block (block 16) and mid-chunk
(chunks of 64), a repeated prompt (all but its last token cached), a second turn that reuses the
first turn's decoded tokens, n > 1, and a pool small enough that cache entries are evicted and
sequences preempted while others run. The block-level properties (ref counts, no leak, the
ranks' mirror of the engine) are in test_scheduler.py.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sp_serve.engine.engine import prefix_caching_enabled
from tests.checkpoints import CHECKPOINT_CASES, write_hf_checkpoint

NEW = 6
DOC = 203  # ends mid-block (16) and mid-chunk (64)
ENGINE = dict(scheduler="fcfs", max_num_batched_tokens=64, cpu_threads=1, kv_cache_memory=2**24,
              dist_timeout_s=60)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    cases = dict(CHECKPOINT_CASES)
    return {name: str(write_hf_checkpoint(root / name, **cases[name]))
            for name in ("llama-gqa", "qwen2-bias-tied", "llama3-params-head-dim")}


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(model, prompt: list[int], new: int = NEW) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("sp,case", [(1, "llama-gqa"), (2, "llama-gqa"), (3, "llama-gqa"),
                                     (2, "qwen2-bias-tied"), (3, "llama3-params-head-dim")])
def test_cache_hits_give_hf_greedy_tokens(checkpoints, sp, case):
    from sp_serve import LLM, SamplingParams
    ckpt = checkpoints[case]
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    doc = _tokens(DOC, 1)
    first = doc + _tokens(5, 2)
    with LLM(ckpt, sp_size=sp, **ENGINE) as llm:
        blocks = llm.engine.blocks
        assert llm.engine.enable_prefix_caching  # the default

        def run(prompt: list[int], n: int = 1) -> tuple[list[list[int]], int]:
            hits = blocks.prefix_cache_hits
            out = llm.generate([prompt], SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, n=n))
            return [c.token_ids for c in out[0].outputs], blocks.prefix_cache_hits - hits

        turn1, hits = run(first)
        assert hits == 0 and turn1 == [_hf_greedy(hf, first)]
        cases = [
            (doc + _tokens(9, 3), DOC),  # another question on the document
            (doc + _tokens(9, 3), DOC + 8),  # the same prompt again: all but its last token
            (doc[:150] + _tokens(20, 4), 150),  # a shorter prefix, mid-block, mid-chunk
            # the next turn of the first conversation: its prompt and all but the last decoded
            # token (never fed back) are cached; those were placed by decode, not zigzag
            (first + turn1[0] + _tokens(7, 5), len(first) + NEW - 1),
        ]
        for prompt, cached in cases:
            tokens, hits = run(prompt)
            assert hits == cached, (len(prompt), hits, cached)
            assert tokens == [_hf_greedy(hf, prompt)], (len(prompt), cached)
        # n > 1: the first copy computes the new prompt, the other two wait and share it all
        prompt = _tokens(90, 6)
        tokens, hits = run(prompt, n=3)
        assert tokens == [_hf_greedy(hf, prompt)] * 3 and hits == 2 * (len(prompt) - 1)
        assert blocks.usage() == 0 and not blocks.tokens  # only cache entries hold KV
        blocks.evict_all()
        llm.engine.heartbeat()  # the frees reach the ranks
        assert blocks.free_blocks == [llm.engine.runtime.num_blocks] * sp
        assert llm.engine.runtime.worker.kv.num_free_blocks == llm.engine.runtime.num_blocks


def test_eviction_and_preemption_under_memory_pressure_keep_outputs_exact(checkpoints):
    """A pool of 40 blocks per rank at SP=2: six sequences (four share a 300-token document) do
    not fit together, so cache entries are evicted and sequences preempted (recomputed) while
    others run on shared blocks. Every output equals HF's, and the blocks all come back."""
    from sp_serve import LLM, SamplingParams
    ckpt = checkpoints["llama-gqa"]
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    doc = _tokens(300, 7)
    prompts = [doc + _tokens(5, 10 + i) for i in range(4)] + [_tokens(250, 20 + i) for i in range(2)]
    new = 120
    per_block = 2 * 2 * 2 * 16 * 4 * 16  # layers x (k, v) x kv heads x head_dim x fp32 x block
    engine = {**ENGINE, "kv_cache_memory": 40 * per_block, "max_num_batched_tokens": 128}
    with LLM(ckpt, sp_size=2, **engine) as llm:
        assert llm.engine.runtime.num_blocks == 40
        warm = llm.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        assert warm[0].outputs[0].token_ids == _hf_greedy(hf, prompts[0], 2)
        outs = llm.generate(prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.blocks.prefix_cache_hits >= 3 * 300
        for prompt, out in zip(prompts, outs):
            assert out.outputs[0].token_ids == _hf_greedy(hf, prompt, new)
        blocks = llm.engine.blocks
        assert blocks.usage() == 0
        blocks.evict_all()
        llm.engine.heartbeat()
        assert blocks.free_blocks == [40, 40] and llm.engine.runtime.worker.kv.num_free_blocks == 40


def test_no_enable_prefix_caching_keeps_nothing(checkpoints):
    from sp_serve import LLM, SamplingParams
    prompt = _tokens(100, 8)
    with LLM(checkpoints["llama-gqa"], sp_size=1, enable_prefix_caching=False, **ENGINE) as llm:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        a, b = (llm.generate([prompt], params)[0].outputs[0].token_ids for _ in range(2))
        assert a == b and llm.engine.blocks.prefix_cache_hits == 0
        assert not llm.engine.blocks.entries
        assert llm.engine.blocks.free_blocks == [llm.engine.runtime.num_blocks]


def test_dynamic_rope_turns_prefix_caching_off_or_refuses_it(tmp_path):
    """Dynamic-NTK RoPE rotates a prompt by its whole length: no prefix can be shared."""
    from sp_serve.config import EngineConfig
    from sp_serve.model.spec import load_spec
    cases = dict(CHECKPOINT_CASES)
    ckpt = str(write_hf_checkpoint(tmp_path / "dyn", **cases["llama-dynamic-scaling"]))
    spec = load_spec(ckpt)
    assert prefix_caching_enabled(EngineConfig(model=ckpt), spec) is False
    assert prefix_caching_enabled(EngineConfig(model=ckpt, enable_prefix_caching=False), spec) is False
    with pytest.raises(ValueError, match="--no-enable-prefix-caching"):
        prefix_caching_enabled(EngineConfig(model=ckpt, enable_prefix_caching=True), spec)
    from sp_serve import LLM
    with pytest.raises(ValueError, match="dynamic-NTK"):
        LLM(ckpt, enable_prefix_caching=True)


def test_bad_enable_prefix_caching_value():
    from sp_serve.config import EngineConfig
    with pytest.raises(ValueError, match="enable_prefix_caching must be True, False or None"):
        EngineConfig(model="m", enable_prefix_caching="yes")


def test_cli_flag_spellings():
    from sp_serve.cli import build_parser, engine_config
    parser = build_parser()
    for flag, value in [([], None), (["--enable-prefix-caching"], True),
                        (["--no-enable-prefix-caching"], False)]:
        args = parser.parse_args(["generate", "--model", "m", "--prompt", "x", *flag])
        assert engine_config(args).enable_prefix_caching is value


def test_server_reports_cached_tokens_and_prefix_cache_metrics(tiny_model_dir):
    """Over HTTP (the real engine at SP=2 behind the app): usage.prompt_tokens_details.
    cached_tokens as OpenAI reports it (0 on a miss; streamed usage too), and vLLM's
    prefix_cache_queries / prefix_cache_hits counters in prompt tokens."""
    import httpx

    from sp_serve.config import EngineConfig
    from sp_serve.engine.async_engine import AsyncEngine
    from sp_serve.engine.engine import LLMEngine
    from sp_serve.server.app import build_app
    from tests.live_app import serve_app
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), sp_size=2, **ENGINE))
    aengine = AsyncEngine(engine, "tiny")
    prompt = _tokens(120, 9)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0}
    try:
        with serve_app(build_app(aengine)) as url, httpx.Client(base_url=url, timeout=120) as client:
            first = client.post("/v1/completions", json=body).json()
            second = client.post("/v1/completions", json=body).json()
            assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
            assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 119}
            assert second["choices"][0]["text"] == first["choices"][0]["text"]
            stream = {**body, "prompt": prompt + [5], "stream": True,
                      "stream_options": {"include_usage": True}}
            with client.stream("POST", "/v1/completions", json=stream) as response:
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
            import json
            usage = json.loads(events[-1])["usage"]
            assert usage["prompt_tokens"] == 121 and usage["prompt_tokens_details"]["cached_tokens"] == 120
            metrics = client.get("/metrics").text
            assert 'sp_serve:prefix_cache_queries_total{model_name="tiny"} 361.0' in metrics
            assert 'sp_serve:prefix_cache_hits_total{model_name="tiny"} 239.0' in metrics
    finally:
        aengine.close()
        engine.shutdown()
