"""`sp-serve serve` end to end: a real server process at SP=2 on a tiny checkpoint, driven by the
official openai client (and raw HTTP where the client would hide the response).

Process start is the slow part, so one module-scoped server serves the ordinary cases; the
tiny-KV-pool server (preemption, then SIGTERM) and the rank-kill server are the only others.
No timing assertions: every wait polls with a generous deadline and only guards against hangs.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from sp_serve.parallel.launch import RANK_MODULE
from tests.server_proc import (
    Server,
    alive,
    cmdline,
    descendants,
    proc_stat,
    start_server,
    wait_until,
)

MAX_MODEL_LEN = 16384  # room for a request that outlives every deadline below


# ---- prompts and their alone-served outputs -------------------------------------------------------
def make_prompts(count: int, seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    """Token-id prompts of mixed lengths (byte tokens of the tiny tokenizer: no special ids)."""
    rng = random.Random(seed)
    return [[rng.randrange(32, 127) for _ in range(rng.choice(lengths) + rng.randrange(8))]
            for _ in range(count)]


def greedy(client: openai.OpenAI, model: str, prompt: list[int], max_tokens: int) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == max_tokens
    return out.choices[0].text


async def greedy_all(server: Server, prompts: list[list[int]], max_tokens: int) -> list[str]:
    async with server.async_client() as client:
        async def one(prompt: list[int]) -> str:
            out = await client.completions.create(model=server.model, prompt=prompt,
                                                  max_tokens=max_tokens, temperature=0,
                                                  extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == max_tokens
            return out.choices[0].text

        return list(await asyncio.gather(*(one(p) for p in prompts)))


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from sp_serve.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-16k"), max_position_embeddings=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # A small --max-num-batched-tokens so the longer prompts are prefilled in chunks.
    logs = tmp_path_factory.mktemp("logs")
    s = start_server(model_dir, logs, "tiny-sp2",
                     "--kv-cache-memory", "64MiB", "--max-num-batched-tokens", "512",
                     "--step-log", str(logs / "steps.jsonl"))
    s.step_log = logs / "steps.jsonl"
    yield s
    s.stop()


# ---- the ordinary cases on the shared server --------------------------------------------------------
def test_completion(server):
    out = server.client.completions.create(model=server.model, prompt="The quick brown fox",
                                           max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == server.model
    assert out.choices[0].finish_reason == "length" and isinstance(out.choices[0].text, str)
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_greedy_output_equals_transformers(server, model_dir):
    """The served tokens against an outside reference: transformers' own greedy decoding of
    the same checkpoint, for a prompt longer than --max-num-batched-tokens (so it is prefilled
    in chunks, the later ones attending to the earlier ones' sharded KV)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = make_prompts(1, seed=11, lengths=(700,))[0]
    max_tokens = 12
    out = server.client.completions.create(model=server.model, prompt=prompt,
                                           max_tokens=max_tokens, temperature=0,
                                           extra_body={"ignore_eos": True})
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones_like(ids))[0, len(prompt):]
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert out.usage.completion_tokens == max_tokens
    assert out.choices[0].text == tok.decode(ref.tolist(), skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)


def test_chat(server):
    out = server.client.chat.completions.create(
        model=server.model, messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hello there!"}],
        max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    assert out.usage.prompt_tokens > 10  # the chat template wraps the two messages


def test_streaming_has_usage_in_the_last_chunk(server):
    prompt = "Streaming, one token at a time"
    whole = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=10,
                                             temperature=0, extra_body={"ignore_eos": True})
    chunks = list(server.client.completions.create(
        model=server.model, prompt=prompt, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text
    assert body[-1].choices[0].finish_reason == "length"

    chat_chunks = list(server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    assert chat_chunks[-1].choices == [] and chat_chunks[-1].usage.completion_tokens == 5


def test_64_concurrent_requests_match_their_alone_outputs(server):
    """Greedy outputs do not depend on batching: each of 64 concurrent requests of mixed lengths
    (some chunked) equals the same prompt served alone."""
    prompts = make_prompts(64, seed=1, lengths=(3, 20, 60, 200, 700, 1500))
    alone = [greedy(server.client, server.model, p, 12) for p in prompts]
    together = asyncio.run(greedy_all(server, prompts, 12))
    mismatched = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
    assert not mismatched, f"outputs differ under batching for prompts {mismatched}"
    assert len(set(alone)) > 32  # the prompts really differ


def test_step_log_records_the_steps_served(server):
    """`--step-log`: every measured step's shape and seconds, which `plan --simulate --step-log`
    fits (after the 64 concurrent requests there are prefill and decode steps of all sizes)."""
    server.client.completions.create(model=server.model, prompt="log these steps", max_tokens=6,
                                     temperature=0, extra_body={"ignore_eos": True})
    records = [json.loads(line) for line in server.step_log.read_text().splitlines()]
    decode = [r for r in records if r["decode"][0] and not r["chunks"]]
    prefill = [r for r in records if r["chunks"] and not r["decode"][0]]
    assert len(decode) >= 5 and len(prefill) >= 1, records[-5:]
    assert all(r["measured_s"] > 0 and r["predicted_s"] > 0 for r in records)
    assert all(n >= 1 and c >= 0 for r in prefill for n, c in r["chunks"])


def test_metrics_exist_and_move(server):
    names = ["sp_serve:time_to_first_token_seconds_count", "sp_serve:inter_token_latency_seconds_count",
             "sp_serve:e2e_request_latency_seconds_count", "sp_serve:request_queue_time_seconds_count",
             "sp_serve:prompt_tokens_total", "sp_serve:generation_tokens_total"]
    before = {n: server.metric(n) for n in names}
    success = server.metric("sp_serve:request_success_total", finished_reason="length")
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                  "num_preemptions_total"):
        assert any(k.startswith(f"sp_serve:{gauge}{{") for k in server.metrics()), gauge
    out = server.client.completions.create(model=server.model, prompt=[65] * 30, max_tokens=7,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 7
    after = {n: server.metric(n) for n in names}
    assert after["sp_serve:prompt_tokens_total"] - before["sp_serve:prompt_tokens_total"] == 30
    assert after["sp_serve:generation_tokens_total"] - before["sp_serve:generation_tokens_total"] == 7
    assert after["sp_serve:inter_token_latency_seconds_count"] - before[
        "sp_serve:inter_token_latency_seconds_count"] == 6
    for n in names[:4]:
        assert after[n] == before[n] + (6 if "inter_token" in n else 1), n
    assert server.metric("sp_serve:request_success_total", finished_reason="length") == success + 1


def test_disconnect_mid_stream_frees_the_kv(server):
    aborted = server.metric("sp_serve:request_success_total", finished_reason="abort")
    generated = server.metric("sp_serve:generation_tokens_total")
    max_tokens = MAX_MODEL_LEN - 100  # would run for minutes: only an abort ends it in time
    stream = server.client.completions.create(
        model=server.model, prompt=[66] * 64, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    seen = 0
    for chunk in stream:
        seen += len(chunk.choices[0].text) > 0 or 1
        if seen >= 3:
            break
    assert server.metric("sp_serve:kv_cache_usage_perc") > 0
    assert server.metric("sp_serve:num_requests_running") == 1
    stream.close()  # the client goes away mid-stream

    def freed() -> bool:
        return (server.metric("sp_serve:kv_cache_usage_perc") == 0
                and server.metric("sp_serve:num_requests_running") == 0
                and server.metric("sp_serve:num_requests_waiting") == 0)

    wait_until(freed, 20, "KV usage and running back to 0 after the disconnect", server)
    assert server.metric("sp_serve:request_success_total", finished_reason="abort") == aborted + 1
    assert server.metric("sp_serve:generation_tokens_total") - generated < max_tokens


def _post(server: Server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60, **kwargs)


def _assert_openai_400(response: httpx.Response, needle: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    error = body["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert needle in error["message"].lower(), error["message"]


def test_errors_are_400_with_the_openai_envelope(server):
    model = server.model
    too_long = [65] * (MAX_MODEL_LEN + 1)
    _assert_openai_400(_post(server, "/v1/completions",
                             json={"model": model, "prompt": too_long, "max_tokens": 4}),
                       "context")
    _assert_openai_400(_post(server, "/v1/completions",
                             json={"model": model, "prompt": [65] * 100,
                                   "max_tokens": MAX_MODEL_LEN}), "context")
    _assert_openai_400(_post(server, "/v1/chat/completions",
                             json={"model": model, "max_tokens": 4, "stream": True,
                                   "messages": [{"role": "user", "content": "x" * (MAX_MODEL_LEN * 2)}]}),
                       "context")
    _assert_openai_400(_post(server, "/v1/completions",
                             json={"model": model, "prompt": "hi", "temperature": -1}),
                       "temperature")
    _assert_openai_400(_post(server, "/v1/chat/completions",
                             json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                   "temperature": "hot"}), "temperature")
    _assert_openai_400(_post(server, "/v1/completions", content=b'{"model": "x", "prompt": ',
                             headers={"content-type": "application/json"}), "json")
    with pytest.raises(openai.BadRequestError) as info:  # and the client sees it as such
        server.client.completions.create(model=model, prompt=too_long, max_tokens=4)
    assert info.value.status_code == 400
    # The server is still fine afterwards.
    assert greedy(server.client, model, [70] * 5, 3)


# ---- a tiny KV pool: preemption, then SIGTERM --------------------------------------------------------
# The tiny model stores 512 bytes of KV per token and rank: 16 blocks of 16 tokens per rank. A
# request below (~110 + 120 tokens) needs ~8 blocks per rank at its end; a few at once overflow.
TINY_POOL_BYTES = 16 * 16 * 512


@pytest.fixture(scope="module")
def tiny_pool_server(model_dir, tmp_path_factory):
    s = start_server(model_dir, tmp_path_factory.mktemp("logs-tiny-pool"), "tiny-pool",
                     "--kv-cache-memory", str(TINY_POOL_BYTES))
    yield s
    s.stop()


def test_preemption_under_a_tiny_kv_pool_keeps_outputs(tiny_pool_server):
    server = tiny_pool_server
    prompts = make_prompts(10, seed=2, lengths=(20, 60, 100))
    alone = [greedy(server.client, server.model, p, 120) for p in prompts]
    assert server.metric("sp_serve:num_preemptions_total") == 0  # one at a time fits
    together = asyncio.run(greedy_all(server, prompts, 120))
    assert server.metric("sp_serve:num_preemptions_total") > 0, server.log_tail()
    mismatched = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
    assert not mismatched, f"outputs differ after preemption for prompts {mismatched}"
    wait_until(lambda: server.metric("sp_serve:kv_cache_usage_perc") == 0, 20, "an empty pool", server)


def test_sigterm_exits_cleanly_and_leaves_no_child(tiny_pool_server):
    server = tiny_pool_server
    kids = {pid: proc_stat(pid) for pid in descendants(server.proc.pid)}
    kids = {pid: stat[19] for pid, stat in kids.items() if stat is not None}
    assert any(RANK_MODULE in cmdline(pid) for pid in kids), "no rank process found"
    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the server did not exit after SIGTERM\n{server.log_tail()}") from None
    assert rc == 0, server.log_tail()
    wait_until(lambda: not [p for p, start in kids.items() if alive(p, start)], 30,
               "every child process to exit", server)


# ---- SIGTERM with requests running: drain, then end what is left --------------------------------
def _collect_stream(server: Server, body: dict, out: list) -> None:
    """Appends each SSE data payload (a dict, or "[DONE]"); an HTTP error ends the list."""
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    except httpx.HTTPError as exc:
        out.append(exc)


def _refused(server: Server) -> bool:
    try:
        httpx.get(server.url + "/health", timeout=5)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        pass
    return False


def test_sigterm_drains_then_ends_running_streams(model_dir, tmp_path_factory):
    """SIGTERM: new connections are refused, a short request (~2 s) still finishes, a stream that
    outlives --shutdown-timeout ends with an error event and [DONE]; exit 0, no traceback."""
    server = start_server(model_dir, tmp_path_factory.mktemp("logs-drain"), "drain",
                          "--scheduler", "fcfs", "--shutdown-timeout", "15")
    try:
        long_events: list = []
        long_body = {"model": server.model, "prompt": [68] * 16, "stream": True,
                     "max_tokens": MAX_MODEL_LEN - 100, "ignore_eos": True}
        long_thread = threading.Thread(target=_collect_stream, args=(server, long_body, long_events))
        long_thread.start()
        short: dict = {}

        def short_request() -> None:
            short["response"] = httpx.post(server.url + "/v1/completions", timeout=120, json={
                "model": server.model, "prompt": [69] * 16, "max_tokens": 100, "ignore_eos": True})

        wait_until(lambda: len(long_events) >= 2, 60, "the long stream to start", server)
        short_thread = threading.Thread(target=short_request)
        short_thread.start()
        wait_until(lambda: server.metric("sp_serve:num_requests_running") == 2, 60,
                   "both requests to run", server)
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _refused(server), 60, "new connections to be refused", server)
        assert long_thread.is_alive(), "the stream ended before the drain timeout"
        short_thread.join(timeout=120)
        response = short["response"]
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 100
        long_thread.join(timeout=120)
        assert long_events[-1] == "[DONE]", long_events[-3:]
        error = long_events[-2]["error"]
        assert error["code"] == 503 and "shutting down" in error["message"], error
        assert all("choices" in e for e in long_events[:-2])
        rc = server.proc.wait(timeout=60)
        assert rc == 0, server.log_tail()
        assert "Traceback" not in server.log.read_text(), server.log_tail()
    finally:
        server.stop()


# ---- a rank killed under the server --------------------------------------------------------------
def test_killed_rank_turns_health_503_or_ends_the_server(model_dir, tmp_path_factory):
    server = start_server(model_dir, tmp_path_factory.mktemp("logs-rank-kill"), "rank-kill")
    try:
        ranks = [p for p in descendants(server.proc.pid) if RANK_MODULE in cmdline(p)]
        assert len(ranks) == 1, [(p, cmdline(p)) for p in descendants(server.proc.pid)]
        # A request in flight when the rank dies must end too (an error, not a hang).
        ended = threading.Event()

        def stream_forever() -> None:
            try:
                with httpx.stream("POST", server.url + "/v1/completions", timeout=120, json={
                        "model": server.model, "prompt": [67] * 16, "max_tokens": MAX_MODEL_LEN - 100,
                        "ignore_eos": True, "stream": True}) as response:
                    for _ in response.iter_lines():
                        pass
            except httpx.HTTPError:
                pass
            finally:
                ended.set()

        threading.Thread(target=stream_forever, daemon=True).start()
        wait_until(lambda: server.metric("sp_serve:num_requests_running") == 1, 60,
                   "the streaming request to run", server)
        os.kill(ranks[0], signal.SIGKILL)

        saw_503 = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.proc.poll() is None and not saw_503:
            try:
                saw_503 = httpx.get(server.url + "/health", timeout=5).status_code == 503
            except httpx.HTTPError:
                pass  # the server is going away
            time.sleep(0.2)
        rc = server.proc.poll()
        assert saw_503 or (rc is not None and rc != 0), f"still healthy, rc={rc}\n{server.log_tail()}"
        # Either way it then ends, non-zero, and the request in flight ends with it.
        try:
            rc = server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server hangs after a rank died\n{server.log_tail()}") from None
        assert rc != 0
        assert ended.wait(timeout=60), "the in-flight request hangs"
    finally:
        server.stop()
