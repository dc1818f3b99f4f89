"""OpenAI's echo and vLLM's prompt_logprobs and sampling extensions over HTTP, on the real
engine (the tiny checkpoint at SP=2, prompts chunked at 32 tokens), with the openai client.

- echo + logprobs as lm-evaluation-harness' local-completions sends them (loglikelihood and
  loglikelihood_rolling): OpenAI's shape (prompt text first, text_offset, tokens, the first
  token's logprob null) and every prompt logprob equal to transformers' log_softmax;
- prompt_logprobs on completions (per choice) and chat (per response), vLLM's shape;
- min_tokens, logit_bias, against the engine's greedy output.
"""
from __future__ import annotations

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from sp_serve.config import EngineConfig
from sp_serve.engine.async_engine import AsyncEngine
from sp_serve.engine.engine import LLMEngine
from sp_serve.serve import model_info
from sp_serve.server.app import build_app
from tests.live_app import serve_app

MODEL = "tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), sp_size=2, scheduler="fcfs",
                                    max_num_batched_tokens=32, cpu_threads=1, dist_timeout_s=60))
    aengine = AsyncEngine(engine, MODEL)
    app = build_app(aengine, served_model_name=MODEL,
                    extra_model_info=model_info(engine, engine.config))
    try:
        with serve_app(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                   timeout=120)
            yield client, url, engine
    finally:
        aengine.close()


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)

    return logprobs


def _ids(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def test_echo_has_openai_shape_and_hf_logprobs(served, hf):
    client, _, engine = served
    prompt = "The quick brown fox jumps over the lazy dog. " * 3  # > 32 tokens: chunked
    ids = _ids(engine, prompt)
    out = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2,
                                    max_tokens=1, temperature=0)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 1 == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets
    ref = hf(ids)
    for p in range(1, len(ids)):
        assert abs(lp.token_logprobs[p] - float(ref[p - 1, ids[p]])) < TOL, p
        assert len(lp.top_logprobs[p]) >= 2  # the prompt token and the top 2 (may coincide)
    # the generated token's logprob is the last entry, of the same distribution
    assert abs(lp.token_logprobs[-1] - float(ref[-1].max())) < TOL
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 1


def test_lm_eval_loglikelihood_requests(served, hf):
    """What lm-eval's local-completions sends for loglikelihood (context + continuation, token
    ids, echo, logprobs=1, max_tokens=1) and how it reads the answer."""
    client, _, engine = served
    context = _ids(engine, "Question: what is the capital of France?\nAnswer:")
    continuations = [_ids(engine, " Paris"), _ids(engine, " London is the capital of England")]
    prompts = [context + c for c in continuations]
    out = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1,
                                    max_tokens=1, temperature=0, seed=1234)
    for prompt, cont, choice in zip(prompts, continuations, sorted(out.choices,
                                                                  key=lambda c: c.index)):
        ctxlen = len(context)
        got = sum(choice.logprobs.token_logprobs[ctxlen:-1])
        ref = hf(prompt)
        want = sum(float(ref[p - 1, prompt[p]]) for p in range(ctxlen, len(prompt)))
        assert abs(got - want) < TOL * len(cont)
        # lm-eval's is_greedy: the continuation token is the top one at every position
        lp = choice.logprobs
        greedy = all(max(top, key=top.get) == tok
                     for tok, top in zip(lp.tokens[ctxlen:-1], lp.top_logprobs[ctxlen:-1]))
        assert greedy == all(int(ref[p - 1].argmax()) == prompt[p]
                             for p in range(ctxlen, len(prompt)))
    # loglikelihood_rolling: the whole document, its first token unconditioned
    doc = _ids(engine, "Rolling perplexity over a document that is long enough to be chunked. " * 2)
    out = client.completions.create(model=MODEL, prompt=doc, echo=True, logprobs=0,
                                    max_tokens=1, temperature=0)
    token_logprobs = out.choices[0].logprobs.token_logprobs
    ref = hf(doc)
    want = sum(float(ref[p - 1, doc[p]]) for p in range(1, len(doc)))
    assert abs(sum(token_logprobs[1:-1]) - want) < TOL * len(doc)


def test_echo_streams_the_prompt_first(served):
    client, _, engine = served
    prompt = "Once upon a time"
    events = list(client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=3,
                                            temperature=0, stream=True))
    text = "".join(e.choices[0].text for e in events if e.choices)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    assert events[0].choices[0].text.startswith(prompt)
    assert text == prompt + plain.choices[0].text


def test_prompt_logprobs_vllm_shape(served, hf):
    client, url, engine = served
    prompt = "Sequence parallelism splits a prompt over ranks."
    ids = _ids(engine, prompt)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 3}
    got = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
    plp = got["choices"][0]["prompt_logprobs"]
    ref = hf(ids)
    assert len(plp) == len(ids) and plp[0] is None
    for p in range(1, len(ids)):
        entry = plp[p][str(ids[p])]
        assert abs(entry["logprob"] - float(ref[p - 1, ids[p]])) < TOL
        assert entry["rank"] == int((ref[p - 1] > ref[p - 1, ids[p]]).sum()) + 1
        assert len(plp[p]) in (3, 4)  # the top 3, plus the prompt token when not among them
    chat = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
        "prompt_logprobs": 0}).json()
    plp = chat["prompt_logprobs"]
    assert plp[0] is None and all(len(e) == 1 for e in plp[1:])
    stream = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "prompt_logprobs": 0})
    assert stream.status_code == 400 and stream.json()["error"]["param"] == "prompt_logprobs"


def test_min_tokens_and_logit_bias(served, hf):
    client, url, engine = served
    prompt = "Hello"
    ids = _ids(engine, prompt)
    t1 = int(hf(ids)[-1].argmax())
    t2 = int(hf(ids + [t1])[-1].argmax())  # the greedy second token: make it a stop token
    short = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"stop_token_ids": [t2], "ignore_eos": True})
    assert short.usage.completion_tokens <= 2 and short.choices[0].finish_reason == "stop"
    long = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                     extra_body={"stop_token_ids": [t2], "ignore_eos": True,
                                                 "min_tokens": 5})
    assert long.usage.completion_tokens >= 5
    # a +100 bias makes a token the greedy choice at every step
    tokens = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 0,
        "logit_bias": {"42": 100}, "ignore_eos": True}).json()["choices"][0]["logprobs"]["tokens"]
    assert tokens == [engine.tokenizer.decode([42])] * 4
    bad = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "logit_bias": {str(10**8): 1}})
    assert bad.status_code == 400 and "logit_bias" in bad.json()["error"]["message"]
    bad = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 2, "min_tokens": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_tokens"
    bad = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "best_of_n_tricks": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "best_of_n_tricks"


def test_engine_metrics_iteration_tokens_and_cache_config(served):
    client, url, engine = served
    client.completions.create(model=MODEL, prompt="count my tokens " * 5, max_tokens=3)
    text = httpx.get(url + "/metrics", timeout=30).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    label = f'model_name="{MODEL}"'
    assert samples[f"sp_serve:iteration_tokens_total_count{{{label}}}"] >= 3  # prefill + 2 decodes
    assert samples[f"sp_serve:iteration_tokens_total_sum{{{label}}}"] >= 3
    info = [k for k in samples if k.startswith("sp_serve:cache_config_info{")]
    assert len(info) == 1 and f'block_size="{engine.config.block_size}"' in info[0]
    assert 'sp_size="2"' in info[0] and 'tp_size="1"' in info[0] and samples[info[0]] == 1.0
    # /v1/models reports the layout too (what `bench serve` records)
    card = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["sp_serve"]
    assert (card["sp_size"], card["tp_size"]) == (2, 1) == (engine.sp_size, engine.tp_size)
    assert card["scheduler"] == "fcfs" and card["device"] == engine.device_name
    # KV capacity in tokens (over the ranks; the pool's block count follows the KV dtype)
    assert 'cache_dtype="auto"' in info[0] and 'preemption_mode="recompute"' in info[0]
    capacity = samples[f"sp_serve:kv_cache_capacity_tokens{{{label}}}"]
    assert capacity == engine.kv_capacity_tokens == 2 * engine.runtime.num_blocks * 16
    for name in ("num_swapped_out_total", "num_swapped_in_total", "swapped_out_blocks_total",
                 "swapped_in_blocks_total", "num_requests_swapped"):
        assert samples[f"sp_serve:{name}{{{label}}}"] == 0


# ---- structured outputs ------------------------------------------------------------------------

def _random_schema(rng, depth: int = 0) -> dict:
    """A small random JSON schema: objects of bounded integers, numbers, booleans, enums,
    short strings, arrays and (once) a nested object; additionalProperties false."""
    kinds = ["integer", "number", "boolean", "enum", "string", "array", "null"]
    if depth == 0:
        kinds.append("object")
    props = {}
    for i in range(rng.randint(1, 4)):
        kind = rng.choice(kinds)
        if kind == "integer":
            lo = rng.randint(-50, 50)
            prop = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
        elif kind == "number":
            prop = {"type": "number", "minimum": -10, "maximum": 10}
        elif kind == "enum":
            prop = {"enum": rng.sample(["red", "green", "blue", "a b", "ü", "\"q\""], 3)}
        elif kind == "string":
            prop = {"type": "string", "minLength": 1, "maxLength": rng.randint(1, 6)}
        elif kind == "array":
            prop = {"type": "array", "items": {"type": "boolean"}, "maxItems": rng.randint(0, 3)}
        elif kind == "object":
            prop = _random_schema(rng, depth + 1)
        else:
            prop = {"type": kind}
        props[f"k{i}_{kind}"] = prop
    required = [k for k in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


def test_structured_json_schema_always_parses_and_matches(served):
    import json
    import random

    import jsonschema

    client, _, _ = served
    rng = random.Random(0)
    for case in range(8):
        schema = _random_schema(rng)
        for seed in range(2):
            out = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                max_tokens=300, temperature=1.0, seed=100 * case + seed,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": f"s{case}", "schema": schema}})
            choice = out.choices[0]
            assert choice.finish_reason == "stop", (schema, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), schema)


def test_structured_other_forms(served, tiny_model_dir):
    import json
    import re

    client, url, engine = served
    # any object: a random model may wander in a free string until max_tokens; what it ends
    # (finish_reason stop) parses, and it always starts as an object
    for seed in range(3):
        out = client.completions.create(model=MODEL, prompt="An object:", max_tokens=60,
                                        seed=seed,
                                        extra_body={"response_format": {"type": "json_object"}})
        assert out.choices[0].text.startswith("{")
        if out.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(out.choices[0].text), dict)
    choices = ["Paris", "London", "New York"]
    for seed in range(4):
        out = client.completions.create(model=MODEL, prompt="Capital:", max_tokens=20, seed=seed,
                                        extra_body={"guided_choice": choices})
        assert out.choices[0].text in choices
        out = client.completions.create(
            model=MODEL, prompt="Date:", max_tokens=20, seed=seed,
            extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-(0[1-9]|1[0-2])"}})
        assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])", out.choices[0].text)
        out = client.completions.create(
            model=MODEL, prompt="Yes or no:", max_tokens=20, seed=seed,
            extra_body={"structured_outputs": {"grammar": 'start: ("yes" | "no") "!"'}})
        assert out.choices[0].text in ("yes!", "no!")
    out = client.completions.create(model=MODEL, prompt="n:", max_tokens=50, seed=1,
                                    extra_body={"guided_json": {"type": "integer",
                                                                "minimum": 3, "maximum": 9}})
    assert 3 <= json.loads(out.choices[0].text) <= 9
    # stream: the pieces add up to a document that parses
    stream = client.completions.create(
        model=MODEL, prompt="An object:", max_tokens=200, seed=4, stream=True,
        extra_body={"guided_json": {"type": "object", "properties": {"x": {"type": "boolean"}},
                                    "required": ["x"], "additionalProperties": False}})
    assert json.loads("".join(c.choices[0].text for c in stream if c.choices))["x"] in (True, False)
    # the grammar wins over min_tokens: a grammar that is complete at once, or whose only
    # tokens min_tokens bans, still gives its own output (never a token outside it)
    for body, want in [({"guided_regex": "", "min_tokens": 3}, ""),
                       ({"guided_choice": ["ab"], "min_tokens": 5}, "ab"),
                       ({"guided_choice": ["ab"], "ignore_eos": True}, "ab")]:
        response = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "x", "max_tokens": 8, **body})
        assert response.status_code == 200, (body, response.text)
        assert response.json()["choices"][0]["text"] == want, (body, response.json())
    # bad requests: 400 naming the field, and nothing left in the engine
    for body, param in [
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "structured_outputs"),
        ({"guided_regex": "("}, "guided_regex"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
        ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ]:
        response = httpx.post(url + "/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": "x", "max_tokens": 4, **body})
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, (body, response.json())
    assert not engine.has_unfinished()
    assert engine.blocks.usage() == 0  # every request of this module freed its KV blocks
    assert not engine._grammars._matchers  # and its grammar state
