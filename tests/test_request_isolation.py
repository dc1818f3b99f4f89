"""One request must never take the server down: the real engine (SP=2, tiny model) behind the
real HTTP app, in this process so that a failure can be injected into one request among many.

A failure while sampling, admitting or detokenizing one request fails that request alone (a 500
envelope, or an error event then [DONE] on a stream); the others finish with the tokens they
get alone, the KV goes back to empty and the engine keeps serving.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest

from sp_serve.config import EngineConfig
from sp_serve.engine import engine as engine_module
from sp_serve.engine.async_engine import AsyncEngine
from sp_serve.engine.engine import LLMEngine
from sp_serve.server import stream as stream_module
from sp_serve.server.app import build_app
from tests.live_app import serve_app

MODEL = "tiny-inproc"
POISON_SEED = 666  # sampling raises on this request's 3rd token
POISON_ADMISSION_SEED = 667  # building this request's generator raises
POISON_PROMPT_TAIL = [7, 7, 7]  # detokenizing this prompt's 2nd token raises


@dataclass
class Live:
    url: str
    aengine: AsyncEngine

    def idle(self) -> bool:
        stats = self.aengine.stats()
        return stats.kv_cache_usage == 0 and stats.num_running == 0 and stats.num_waiting == 0


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    config = EngineConfig(model=str(tiny_model_dir), sp_size=2, scheduler="fcfs",
                          kv_cache_memory=32 << 20, max_model_len=1024, dist_timeout_s=60)
    engine = LLMEngine(config)
    aengine = AsyncEngine(engine, MODEL)
    try:
        with serve_app(build_app(aengine)) as url:
            yield Live(url, aengine)
    finally:
        aengine.close()
        engine.shutdown()


def _wait(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


async def _post(client: httpx.AsyncClient, body: dict) -> tuple[int, object]:
    """(status, JSON body) or, for a stream, (status, list of events: dicts then "[DONE]")."""
    if not body.get("stream"):
        response = await client.post("/v1/completions", json=body)
        return response.status_code, response.json()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:  # refused before the stream began: a JSON envelope
            return response.status_code, json.loads(await response.aread())
        events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    return response.status_code, [e if e == "[DONE]" else json.loads(e) for e in events]


def _text(status: int, out) -> str:
    assert status == 200, out
    if isinstance(out, dict):
        return out["choices"][0]["text"]
    assert out[-1] == "[DONE]" and all("error" not in e for e in out[:-1]), out
    return "".join(e["choices"][0]["text"] for e in out[:-1])


async def _run_all(url: str, bodies: list[dict]) -> list[tuple[int, object]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return list(await asyncio.gather(*(_post(client, b) for b in bodies)))


def test_sampling_extremes_do_not_stop_the_engine(live):
    """The fuzzer's findings and their kin: every in-range value is served."""
    cases = [
        ("/v1/completions", {"prompt": "\u0017", "top_p": 5e-324}),
        ("/v1/completions", {"prompt": "hello", "max_tokens": 4, "temperature": 1e-40}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 4, "top_p": 5e-324}),
        ("/v1/completions", {"prompt": "hello", "temperature": 1e300, "top_k": 10**9}),
        ("/v1/completions", {"prompt": "hello", "temperature": 1e-5, "min_p": 1.0}),
        ("/v1/completions", {"prompt": "hello", "repetition_penalty": 1e-300,
                             "presence_penalty": -2, "frequency_penalty": 2}),
        ("/v1/completions", {"prompt": "hello", "repetition_penalty": 1e300, "top_p": 1e-300,
                             "min_p": 5e-324}),
    ]
    with httpx.Client(base_url=live.url, timeout=120) as http:
        for path, body in cases:
            response = http.post(path, json={"max_tokens": 8, **body})
            assert response.status_code == 200, (body, response.text)
    assert live.aengine.is_healthy()


def test_one_failing_request_fails_alone(live, monkeypatch):
    real_sample, real_generator = engine_module.sample, engine_module.make_generator
    calls: Counter = Counter()

    def sample(logits_v, params, generator, *rest):
        if params.seed == POISON_SEED:
            calls[id(generator)] += 1
            if calls[id(generator)] == 3:
                raise RuntimeError("injected sampling failure")
        return real_sample(logits_v, params, generator, *rest)

    def make_generator(params, device):
        if params.seed == POISON_ADMISSION_SEED:
            raise RuntimeError("injected admission failure")
        return real_generator(params, device)

    real_init, real_add = stream_module.IncrementalDetokenizer.__init__, \
        stream_module.IncrementalDetokenizer.add

    def init(self, tokenizer, prompt_ids):
        real_init(self, tokenizer, prompt_ids)
        self.poisoned = list(prompt_ids[-3:]) == POISON_PROMPT_TAIL
        self.added = 0

    def add(self, token_id):
        self.added += 1
        if self.poisoned and self.added == 2:
            raise RuntimeError("injected detokenizer failure")
        return real_add(self, token_id)

    prompts = [[65 + i, 66, 67 + i % 3] * (2 + i) for i in range(8)]
    base = {"model": MODEL, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    bodies = [{**base, "prompt": p, "stream": i % 2 == 1} for i, p in enumerate(prompts)]
    alone = [_text(*asyncio.run(_run_all(live.url, [b]))[0]) for b in bodies]
    assert len(set(alone)) > 4  # the prompts really differ

    monkeypatch.setattr(engine_module, "sample", sample)
    monkeypatch.setattr(engine_module, "make_generator", make_generator)
    monkeypatch.setattr(stream_module.IncrementalDetokenizer, "__init__", init)
    monkeypatch.setattr(stream_module.IncrementalDetokenizer, "add", add)
    sampled = {**base, "temperature": 1.0, "prompt": "poison"}
    # (body, fails mid-stream): a stream that fails before its first token still gets a 500
    # envelope, since its status line waits for the first output.
    poisoned = [
        ({**sampled, "seed": POISON_SEED}, False),
        ({**sampled, "seed": POISON_SEED, "stream": True}, True),
        ({**sampled, "seed": POISON_ADMISSION_SEED}, False),
        ({**sampled, "seed": POISON_ADMISSION_SEED, "stream": True}, False),
        ({**base, "prompt": [80, 81, *POISON_PROMPT_TAIL]}, False),
        ({**base, "prompt": [80, 82, *POISON_PROMPT_TAIL], "stream": True}, True),
    ]
    results = asyncio.run(_run_all(live.url, bodies + [body for body, _ in poisoned]))
    together = [_text(*out) for out in results[:len(bodies)]]
    assert together == alone  # the healthy requests did not notice
    for (body, mid_stream), (status, out) in zip(poisoned, results[len(bodies):]):
        if mid_stream:  # an error event, then [DONE]
            assert status == 200 and out[-1] == "[DONE]", (body, out)
            assert out[-2]["error"]["code"] == 500 and "injected" in out[-2]["error"]["message"]
        else:  # a 500 envelope for this request alone
            assert status == 500 and out["error"]["code"] == 500, (body, out)
            assert "injected" in out["error"]["message"]
    assert _wait(live.idle), live.aengine.stats()  # every failed request's KV was freed
    assert live.aengine.is_healthy()
    monkeypatch.undo()
    again = asyncio.run(_run_all(live.url, bodies[:2]))
    assert [_text(*out) for out in again] == alone[:2]
