"""`sp-serve bench serve` against a fake OpenAI server (FastAPI + uvicorn in a thread, on a
free 127.0.0.1 port) that streams a known number of tokens after controlled sleeps (several
tokens in one chunk when asked, with vLLM's continuous_usage_stats) and rejects prompts holding
"FAIL" with HTTP 400; plus the datasets, arrivals and metrics alone.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from sp_serve.bench import cli as bench_cli
from sp_serve.bench import serve, serve_cli
from sp_serve.bench.arrivals import arrival_times
from sp_serve.bench.client import RequestResult
from sp_serve.bench.config import ServeBenchConfig
from sp_serve.bench.datasets import (
    encode,
    jsonl_requests,
    load_tokenizer,
    long_doc_requests,
    prefix_repetition_requests,
    random_requests,
)
from sp_serve.bench.metrics import compute_metrics, parse_goodput, parse_percentiles
from sp_serve.bench.report import print_summary
from sp_serve.bench.serve import run_benchmark

TTFT_S = 0.15  # the fake server's sleep before the first token
ITL_S = 0.02  # and between tokens
SERVER_INFO = {"sp_size": 4, "tp_size": 2, "attn_backend": "ring", "scheduler": "fcfs",
               "device": "cpu"}

# The keys of `vllm bench serve --save-result` (with --save-detailed) that a result must have.
VLLM_RESULT_KEYS = {
    "date",
    "endpoint_type",
    "backend",
    "label",
    "model_id",
    "tokenizer_id",
    "num_prompts",
    "request_rate",
    "burstiness",
    "max_concurrency",
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "latencies",
    "start_times",
    "errors",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
    "generated_texts",
    *(
        f"{stat}_{m}_ms"
        for stat in ("mean", "median", "std", "p99")
        for m in ("ttft", "tpot", "itl", "e2el")
    ),
}


# --- the fake server ---------------------------------------------------------------------------


@dataclass
class FakeServerState:
    bodies: list[dict] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0


def _fake_app(state: FakeServerState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": "fake-model",
            "object": "model",
            "root": "fake-model",
            "sp_serve": SERVER_INFO,
        }
        return {"object": "list", "data": [card]}

    async def handle(request: Request, chat: bool):
        body = await request.json()
        state.bodies.append(body)
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        if "FAIL" in str(prompt):
            message = {"message": "prompt holds the FAIL marker", "type": "BadRequestError"}
            return JSONResponse({"error": message}, status_code=400)
        n = body["max_completion_tokens"] if chat else body["max_tokens"]
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        # Tokens per text chunk (a chunk of several: text held back until a UTF-8 character is
        # whole); one each unless the body says. With continuous_usage_stats (and usage at all),
        # every chunk carries the running completion_tokens, as vLLM and sp-serve send it.
        per_chunk = body.get("fake_tokens_per_chunk") or [1] * n
        assert sum(per_chunk) == n
        options = body.get("stream_options") or {}
        continuous = options.get("continuous_usage_stats") and not body.get("fake_no_usage")
        sent = 0

        def event(choice: dict) -> str:
            chunk = {"object": "chunk", "choices": [choice]}
            if continuous:
                chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": sent}
            return f"data: {json.dumps(chunk)}\n\n"

        async def stream():
            nonlocal sent
            state.in_flight += 1
            state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
            try:
                await asyncio.sleep(TTFT_S)
                if chat:  # role-only delta first, as OpenAI and vLLM send it: not a token
                    yield event({"index": 0, "delta": {"role": "assistant", "content": ""}})
                for i, k in enumerate(per_chunk):
                    # an engine step per token; the first token's step is in TTFT_S
                    await asyncio.sleep(ITL_S * (k - (i == 0)))
                    sent += k
                    finish = "length" if sent == n else None
                    text = f" w{i}"
                    choice = {"delta": {"content": text}} if chat else {"text": text}
                    yield event({"index": 0, **choice, "finish_reason": finish})
                if not body.get("fake_no_usage"):
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
                    yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state.in_flight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


@pytest.fixture(scope="module")
def fake_server():
    state = FakeServerState()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(_fake_app(state), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the fake server did not start"
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer (so decode -> encode can move token boundaries)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "ring", "zigzag", "cache", "prefill", "decode"]
    corpus = [" ".join(rng.choice(words, 40)) for _ in range(100)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)
    return str(path)


def _bench(base_url: str, **overrides) -> dict:
    config = ServeBenchConfig(base_url=base_url, show_progress=False, **overrides)
    return asyncio.run(run_benchmark(config))


# --- end to end against the fake server ----------------------------------------------------------


def test_stream_timings_counts_and_concurrency(fake_server):
    base_url, state = fake_server
    state.bodies.clear()
    state.peak_in_flight = 0
    result = _bench(
        base_url,
        num_prompts=6,
        random_input_len=32,
        random_output_len=8,
        max_concurrency=3,
        ignore_eos=True,
    )
    assert (result["completed"], result["failed"]) == (6, 0)
    assert result["errors"] == [""] * 6
    assert result["model_id"] == "fake-model"  # the first of GET /v1/models
    # The fake server sleeps TTFT_S before the first token and ITL_S between tokens: lower
    # bounds that hold however loaded the machine is (no upper bound on wall-clock time).
    for ttft, latency in zip(result["ttfts"], result["latencies"]):
        assert TTFT_S <= ttft < latency
    assert all(len(itl) == 8 - 1 for itl in result["itls"])
    assert ITL_S <= result["median_itl_ms"] / 1000
    assert ITL_S <= result["mean_tpot_ms"] / 1000
    for ttft, itl, e2el in zip(result["ttfts"], result["itls"], result["latencies"]):
        assert math.isclose(e2el, ttft + sum(itl), rel_tol=1e-6)
    assert result["output_lens"] == [8] * 6 and result["input_lens"] == [32] * 6
    assert result["total_output_tokens"] == 48 and result["total_input_tokens"] == 192
    # --max-concurrency held on the server side, and the client queued the rest.
    assert state.peak_in_flight <= 3 and result["max_concurrent_requests"] <= 3
    assert max(result["queue_times"]) >= TTFT_S
    # The tags come from the server's /v1/models `sp_serve` field.
    assert {k: result[k] for k in SERVER_INFO} == SERVER_INFO
    body = state.bodies[-1]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert result["tbts"] == result["itls"]  # one token per chunk: TBT is ITL
    assert body["ignore_eos"] is True and body["max_tokens"] == 8
    assert isinstance(body["prompt"], list) and len(body["prompt"]) == 32  # no tokenizer: ids


def test_failed_requests_are_counted_listed_and_saved(fake_server, tmp_path, capsys):
    base_url, _ = fake_server
    lines = [
        {"prompt": "hello there", "output_len": 4},
        {"prompt": "FAIL me"},
        {"prompt": [5, 6, 7]},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)  # `sp-serve bench` with its `serve` subcommand
    args = parser.parse_args(
        [
            "serve",
            "--base-url",
            base_url,
            "--dataset-name",
            "jsonl",
            "--dataset-path",
            str(tmp_path / "data.jsonl"),
            "--num-prompts",
            "6",
            "--random-output-len",
            "3",
            "--request-rate",
            "50",
            "--goodput",
            "ttft:5000",
            "tpot:5000",
            "--save-result",
            "--save-detailed",
            "--result-dir",
            str(tmp_path / "out"),
            "--disable-tqdm",
            "--sp-size",
            "2",
            "--tensor-parallel-size",
            "8",
            "--metadata",
            "run=ci",
        ]
    )
    assert bench_cli.run(args) == 0
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "HTTP 400" in out and "FAIL marker" in out

    (saved,) = (tmp_path / "out").glob("*.json")
    assert saved.name.startswith("openai-50.0qps-fake-model-")
    result = json.loads(saved.read_text())
    assert VLLM_RESULT_KEYS <= set(result), VLLM_RESULT_KEYS - set(result)
    assert {"sp_size", "tp_size", "attn_backend", "scheduler", "device", "git_sha"} <= set(result)
    assert result["sp_size"] == 2 and result["attn_backend"] == "ring"  # flag wins, else server
    assert result["tp_size"] == 8 and result["sp_serve"]["tp_size"] == 2  # the tag, the server's
    assert {"p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms"} <= set(result) and result["run"] == "ci"
    assert (result["completed"], result["failed"]) == (4, 2)
    assert result["request_goodput"] == pytest.approx(4 / result["duration"])
    failed = [e for e in result["errors"] if e]
    assert len(failed) == 2 and all(
        e.startswith("HTTP 400: ") and "FAIL marker" in e for e in failed
    )
    assert result["output_lens"] == [4, 0, 3, 4, 0, 3]  # jsonl output_len, else the default
    # TBT beside ITL: the same summaries, the per-request lists and what TBT means
    assert {f"{stat}_tbt_ms" for stat in ("mean", "median", "std", "p50", "p90", "p99")} <= set(
        result
    )
    assert result["tbts"] == result["itls"]  # the fake sends one token per chunk here
    assert result["tbt_definition"].startswith("time between tokens")
    assert "Time between Tokens" in out and "P99 TBT (ms):" in out


def test_chat_endpoint_with_tokenizer_and_long_doc_marks(fake_server, tokenizer_dir):
    base_url, state = fake_server
    result = _bench(
        base_url,
        endpoint="/v1/chat/completions",
        tokenizer=tokenizer_dir,
        dataset_name="long-doc",
        num_prompts=4,
        long_fraction=0.5,
        long_input_len=300,
        short_input_len=20,
        random_output_len=5,
    )
    assert result["completed"] == 4 and result["backend"] == "openai-chat"
    assert all(len(itl) == 4 for itl in result["itls"])  # the role-only delta is not a token
    assert sorted(result["is_long"]) == [False, False, True, True]
    assert result["num_short_requests"] == 2 and result["completed_short"] == 2
    assert TTFT_S <= result["mean_short_ttft_ms"] / 1000
    assert "p99_short_ttft_ms" in result and "p99_long_ttft_ms" in result
    assert isinstance(state.bodies[-1]["messages"][0]["content"], str)
    assert state.bodies[-1]["max_completion_tokens"] == 5


def test_without_usage_counts_text_chunks_and_timeouts_fail(fake_server):
    base_url, _ = fake_server
    result = _bench(
        base_url,
        num_prompts=2,
        random_input_len=8,
        random_output_len=6,
        extra_body={"fake_no_usage": True},
    )
    assert result["output_lens"] == [6, 6] and result["completed"] == 2
    result = _bench(
        base_url, num_prompts=2, random_input_len=8, random_output_len=3, request_timeout_s=0.05
    )
    assert result["failed"] == 2
    assert all("timed out after 0.05 s" in e for e in result["errors"])


def _per_token(itls: list[float], tokens_per_chunk: list[int]) -> list[float]:
    """What TBT must be: each gap after the first chunk, k times gap / k."""
    return [gap / k for gap, k in zip(itls, tokens_per_chunk[1:]) for _ in range(k)]


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_tbt_shares_a_chunks_gap_among_its_tokens(fake_server, tokenizer_dir, endpoint):
    """A chunk carrying 3 tokens after 3 engine steps: ITL keeps one gap per text chunk (vLLM's
    definition); TBT has 3 samples of a third of that gap. The first chunk's second token is
    part of TTFT: no sample for it. Values are compared with the measured gaps themselves, so
    nothing depends on how fast the machine is."""
    base_url, _ = fake_server
    per_chunk = [2, 1, 3, 1, 1]  # 8 tokens in 5 text chunks
    result = _bench(
        base_url,
        endpoint=endpoint,
        tokenizer=tokenizer_dir,
        num_prompts=2,
        random_input_len=8,
        random_output_len=8,
        extra_body={"fake_tokens_per_chunk": per_chunk},
    )
    assert result["completed"] == 2 and result["output_lens"] == [8, 8]
    for itl, tbt in zip(result["itls"], result["tbts"]):
        assert len(itl) == 4  # one gap per text chunk after the first, as before
        assert len(tbt) == 1 + 3 + 1 + 1
        assert tbt == _per_token(itl, per_chunk)
        assert tbt[1:4] == [itl[1] / 3] * 3
        assert itl[1] >= 3 * ITL_S  # the fake slept three engine steps before that chunk
    gaps = [g for tbt in result["tbts"] for g in tbt]
    assert result["mean_tbt_ms"] == pytest.approx(1000 * np.mean(gaps))
    assert result["p99_tbt_ms"] == pytest.approx(1000 * np.percentile(gaps, 99))
    itls = [g for itl in result["itls"] for g in itl]
    assert result["p99_itl_ms"] == pytest.approx(1000 * np.percentile(itls, 99))


def test_tbt_against_sp_serves_own_frontend(tmp_path):
    """sp-serve's HTTP frontend over tests/fake_engine.py (a byte per token, so "ö" is 2 tokens
    and "✓" 3, and the frontend holds a character's text until it is whole): its per-chunk
    usage, read by the client, gives k = the bytes of the character the chunk carries."""
    from sp_serve.server.app import build_app
    from tests.fake_engine import FakeEngine
    from tests.live_app import serve_app

    text = "Hello, wörld! The quick brown fox ✓"
    assert FakeEngine.reply.startswith(text)
    per_chunk = [len(char.encode()) for char in text]  # one text chunk per character
    engine = FakeEngine(step_s=0.01)  # steps far apart: each chunk is formatted before the next
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "x", "output_len": sum(per_chunk)}))
    with serve_app(build_app(engine, served_model_name="fake-model")) as url:
        result = _bench(url, dataset_name="jsonl", dataset_path=str(tmp_path / "d.jsonl"),
                        num_prompts=2)
    assert result["completed"] == 2, result["errors"]
    assert result["output_lens"] == [len(text.encode())] * 2
    for itl, tbt in zip(result["itls"], result["tbts"]):
        assert len(itl) == len(text) - 1 and len(tbt) == len(text.encode()) - 1
        assert tbt == _per_token(itl, per_chunk)


def test_without_per_chunk_usage_tbt_is_itl(fake_server):
    """A server that sends no usage on its chunks: one token per text chunk, so TBT == ITL
    (and the output length falls back to the text chunks)."""
    base_url, _ = fake_server
    result = _bench(
        base_url,
        num_prompts=2,
        random_input_len=8,
        random_output_len=8,
        extra_body={"fake_tokens_per_chunk": [2, 1, 3, 1, 1], "fake_no_usage": True},
    )
    assert result["completed"] == 2 and result["output_lens"] == [5, 5]
    assert all(len(itl) == 4 for itl in result["itls"])
    assert result["tbts"] == result["itls"]
    for stat in ("mean", "median", "std", "p50", "p90", "p99"):
        assert result[f"{stat}_tbt_ms"] == result[f"{stat}_itl_ms"]


def test_tbt_samples_of_one_chunk():
    from sp_serve.bench.client import _tbt_samples

    assert _tbt_samples(0.3, 7, 4) == [0.3 / 3] * 3
    assert _tbt_samples(0.2, 5, 4) == [0.2]
    assert _tbt_samples(0.2, None, 4) == [0.2]  # this chunk has no usage: one token
    assert _tbt_samples(0.2, 5, None) == [0.2]  # the previous text chunk had none
    assert _tbt_samples(0.2, 4, 4) == [0.2]  # a count that did not advance: still one token


def test_unreachable_server_fails_every_request(capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _bench(f"http://127.0.0.1:{port}", model="m", num_prompts=3, random_input_len=4)
    assert (result["completed"], result["failed"]) == (0, 3)
    assert all(e.startswith("ConnectError") for e in result["errors"])
    with pytest.raises(ValueError, match="cannot list the models"):
        _bench(f"http://127.0.0.1:{port}", num_prompts=1)


# --- datasets -------------------------------------------------------------------------------------


def test_random_prompts_have_exact_token_lengths(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    rng = np.random.default_rng(1)
    requests = random_requests(8, 200, 16, 0.0, rng, tok)
    for r in requests:
        assert isinstance(r.prompt, str) and r.prompt_len == 200 == len(encode(tok, r.prompt))
        assert not set(encode(tok, r.prompt)) & set(tok.all_special_ids)
    varied = random_requests(20, 100, 10, 0.5, rng, tok)
    assert all(
        50 <= r.prompt_len <= 150 and r.prompt_len == len(encode(tok, r.prompt)) for r in varied
    )
    assert len({r.prompt_len for r in varied}) > 5 and all(
        5 <= r.expected_output_len <= 15 for r in varied
    )
    ids = random_requests(3, 40, 4, 0.0, rng, tok, prompt_format="token-ids")
    assert all(isinstance(r.prompt, list) and len(r.prompt) == 40 for r in ids)
    with pytest.raises(ValueError, match="need a tokenizer"):
        random_requests(1, 10, 1, 0.0, rng, None, prompt_format="text")
    with pytest.raises(ValueError, match="random-range-ratio"):
        random_requests(1, 10, 1, 1.5, rng, tok)
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(str(tokenizer_dir) + "/missing")


def test_long_doc_mix(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    requests = long_doc_requests(10, 0.3, 250, 30, 8, 0.0, np.random.default_rng(2), tok)
    assert sum(r.is_long for r in requests) == 3
    assert all(
        r.prompt_len == (250 if r.is_long else 30) == len(encode(tok, r.prompt)) for r in requests
    )
    again = long_doc_requests(10, 0.3, 250, 30, 8, 0.0, np.random.default_rng(2), tok)
    assert [r.prompt for r in again] == [r.prompt for r in requests]  # seeded
    with pytest.raises(ValueError, match="long-fraction"):
        long_doc_requests(10, 1.3, 250, 30, 8, 0.0, np.random.default_rng(2), tok)


def test_prefix_repetition_documents_times_questions(tokenizer_dir):
    """N documents x M questions (vLLM's prefix-repetition): each prompt is one of N shared
    prefixes and its own suffix, in a seeded shuffled order; token-id prompts are exact."""
    rng = np.random.default_rng(3)
    requests = prefix_repetition_requests(12, 40, 7, 3, 5, rng, None, "token-ids")
    assert len(requests) == 12 and all(len(r.prompt) == r.prompt_len == 47 for r in requests)
    assert all(r.expected_output_len == 5 for r in requests)
    prefixes = [tuple(r.prompt[:40]) for r in requests]
    assert sorted(prefixes.count(p) for p in set(prefixes)) == [4, 4, 4]
    assert len({tuple(r.prompt[40:]) for r in requests}) == 12
    assert prefixes[:4] != [prefixes[0]] * 4  # shuffled, not document by document
    again = prefix_repetition_requests(12, 40, 7, 3, 5, np.random.default_rng(3), None, "token-ids")
    assert [r.prompt for r in again] == [r.prompt for r in requests]
    tok = load_tokenizer(tokenizer_dir)
    texts = prefix_repetition_requests(4, 30, 10, 2, 5, np.random.default_rng(3), tok)
    assert all(isinstance(r.prompt, str) and r.prompt_len == 40 for r in texts)
    with pytest.raises(ValueError, match="multiple of --prefix-repetition-num-prefixes"):
        prefix_repetition_requests(10, 40, 7, 3, 5, rng, None, "token-ids")
    with pytest.raises(ValueError, match="--prefix-repetition-prefix-len must be >= 1"):
        prefix_repetition_requests(9, 0, 7, 3, 5, rng, None, "token-ids")
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    config = serve_cli.config_from_args(parser.parse_args(
        ["--dataset-name", "prefix-repetition", "--num-prompts", "32",
         "--prefix-repetition-num-prefixes", "4", "--prefix-repetition-prefix-len", "7000"]))
    assert (config.dataset_name, config.prefix_repetition_num_prefixes,
            config.prefix_repetition_prefix_len) == ("prefix-repetition", 4, 7000)


def test_cached_tokens_from_usage_give_the_hit_rate():
    done = [RequestResult(success=True, ttft=0.1, latency=0.2, prompt_len=100, output_tokens=2,
                          cached_tokens=c) for c in (0, 80, 99)]
    metrics = compute_metrics(done, 1.0, [50.0], None, None)
    assert metrics["total_cached_tokens"] == 179
    assert metrics["prefix_cache_hit_rate"] == pytest.approx(179 / 300)
    plain = [RequestResult(success=True, ttft=0.1, latency=0.2, prompt_len=100, output_tokens=2)]
    assert "prefix_cache_hit_rate" not in compute_metrics(plain, 1.0, [50.0], None, None)


def test_jsonl_parsing(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a b c", "output_len": 7}\n\n{"prompt": [1, 2]}\n')
    requests = jsonl_requests(path, 3, 9)
    assert [(r.prompt, r.prompt_len, r.expected_output_len) for r in requests] == [
        ("a b c", None, 7),
        ([1, 2], 2, 9),
        ("a b c", None, 7),  # cycled
    ]
    cases = {
        '{"prompt": "x"}\n{"prompt": "y",\n': r"d.jsonl:2: not valid JSON",
        '["x"]\n': r"d.jsonl:1: expected a JSON object",
        '{"text": "x"}\n': r'd.jsonl:1: missing "prompt"',
        '{"prompt": ""}\n': r"non-empty string or a non-empty list of token ids",
        '{"prompt": [1, "a"]}\n': r"non-empty string or a non-empty list of token ids",
        '{"prompt": "x", "output_len": 0}\n': r'd.jsonl:1: "output_len" must be an int >= 1',
        "\n\n": r"holds no requests",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            jsonl_requests(path, 1, 4)
    with pytest.raises(ValueError, match="is not a file"):
        jsonl_requests(tmp_path / "nope.jsonl", 1, 4)


def test_top_level_cli_wires_bench_serve():
    from sp_serve.cli import build_parser

    args = build_parser().parse_args(
        ["bench", "serve", "--num-prompts", "3", "--goodput", "ttft:9"]
    )
    assert args.func is serve_cli.run and args.num_prompts == 3 and args.goodput == ["ttft:9"]


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="--dataset-path goes with --dataset-name jsonl"):
        ServeBenchConfig(dataset_name="random", dataset_path="x.jsonl")
    with pytest.raises(ValueError, match="/v1/chat/completions"):
        ServeBenchConfig(endpoint="/generate")
    with pytest.raises(ValueError, match="--max-concurrency must be >= 1"):
        ServeBenchConfig(max_concurrency=0)
    with pytest.raises(ValueError, match="--request-rate must be > 0"):
        ServeBenchConfig(request_rate=0)
    with pytest.raises(ValueError, match="chat endpoint takes text"):
        serve.build_payload(
            ServeBenchConfig(endpoint="/v1/chat/completions"),
            "m",
            random_requests(1, 4, 2, 0.0, np.random.default_rng(0))[0],
        )
    assert parse_percentiles("50,90,99.9") == [50, 90, 99.9]
    with pytest.raises(ValueError, match="metric-percentiles"):
        parse_percentiles("0,101")


# --- arrivals and metrics -------------------------------------------------------------------------


def test_poisson_arrivals_are_seeded_and_at_the_requested_rate():
    times = arrival_times(4000, 10.0, 1.0, np.random.default_rng(7))
    assert times == arrival_times(4000, 10.0, 1.0, np.random.default_rng(7))
    assert times != arrival_times(4000, 10.0, 1.0, np.random.default_rng(8))
    assert np.all(np.diff(times) >= 0) and times[-1] == pytest.approx(400.0)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(0.1, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.08)  # exponential: CV 1
    assert np.sum(np.array(times) < 200) == pytest.approx(2000, rel=0.05)  # steady rate
    even = np.diff(arrival_times(4000, 10.0, 4.0, np.random.default_rng(7)))
    assert even.std() / even.mean() == pytest.approx(0.5, abs=0.05)  # gamma: CV 1/sqrt(shape)
    assert arrival_times(3, math.inf, 1.0, np.random.default_rng(0)) == [0.0, 0.0, 0.0]
    assert arrival_times(3, 2.0, math.inf, np.random.default_rng(0)) == pytest.approx(
        [0.5, 1.0, 1.5]
    )
    with pytest.raises(ValueError, match="--burstiness must be > 0"):
        arrival_times(3, 2.0, 0.0, np.random.default_rng(0))


def _done(ttft: float, latency: float, tokens: int, is_long: bool | None = None) -> RequestResult:
    itl = [(latency - ttft) / (tokens - 1)] * (tokens - 1) if tokens > 1 else []
    return RequestResult(
        success=True,
        prompt_len=10,
        output_tokens=tokens,
        num_text_chunks=tokens,
        ttft=ttft,
        itl=itl,
        latency=latency,
        is_long=is_long,
    )


def test_goodput_and_summaries():
    results = [
        _done(0.05, 0.45, 5),  # TTFT 50 ms, TPOT 100 ms
        _done(0.20, 0.30, 3),  # TTFT 200 ms, TPOT 50 ms
        _done(0.08, 0.08, 1),  # one token: no TPOT, counts as 0 for goodput
        RequestResult(error="HTTP 400: bad"),
    ]
    percentiles = [50.0, 99.0]
    m = compute_metrics(results, 2.0, percentiles, parse_goodput(["ttft:100", "tpot:60"]))
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["request_goodput"] == pytest.approx(1 / 2.0)  # only the one-token request passes
    assert compute_metrics(results, 2.0, percentiles, {"e2el": 400})["request_goodput"] == 1.0
    assert compute_metrics(results, 2.0, percentiles)["request_goodput"] is None
    assert m["mean_ttft_ms"] == pytest.approx(110.0) and m["median_ttft_ms"] == pytest.approx(80.0)
    assert m["mean_tpot_ms"] == pytest.approx(75.0)  # two requests with more than one token
    assert m["p50_tpot_ms"] == pytest.approx(75.0) and "p99_e2el_ms" in m
    assert m["output_lens"] == [5, 3, 1, 0] and m["total_output_tokens"] == 9
    assert m["total_input_tokens"] == 30 and m["request_throughput"] == 1.5
    with pytest.raises(ValueError, match="KEY:MILLISECONDS"):
        parse_goodput(["ttft=100"])
    with pytest.raises(ValueError, match="KEY:MILLISECONDS"):
        parse_goodput(["itl:5"])

    mixed = compute_metrics(
        [_done(0.1, 0.5, 3, False), _done(0.3, 0.9, 3, False), _done(2.0, 3.0, 3, True)],
        3.0,
        [99.0],
    )
    assert mixed["mean_short_ttft_ms"] == pytest.approx(200.0)
    assert mixed["mean_long_ttft_ms"] == pytest.approx(2000.0)
    assert mixed["num_short_requests"] == 2 and mixed["completed_long"] == 1


def test_tbt_metrics_on_a_hand_made_result():
    """TBT is summarised like ITL (same stats, same key spelling), from the per-token samples;
    ITL stays one gap per chunk. A result with ITL gaps but no TBT samples (the simulator, an
    old result file) counts one token per gap."""
    chunked = RequestResult(
        success=True, prompt_len=10, output_tokens=6, num_text_chunks=4, ttft=0.1,
        itl=[0.02, 0.06, 0.02], tbt=[0.02, 0.02, 0.02, 0.02, 0.02], latency=0.2,
    )  # the second gap carried 3 tokens
    plain = RequestResult(
        success=True, prompt_len=10, output_tokens=3, num_text_chunks=3, ttft=0.1,
        itl=[0.04, 0.05], latency=0.19,
    )  # no tbt: one token per gap
    percentiles = [50.0, 90.0, 99.9]
    m = compute_metrics([chunked, plain, RequestResult(error="HTTP 500: x")], 1.0, percentiles)
    itl_ms = [20.0, 60.0, 20.0, 40.0, 50.0]
    tbt_ms = [20.0] * 5 + [40.0, 50.0]
    for name, values in (("itl", itl_ms), ("tbt", tbt_ms)):
        assert m[f"mean_{name}_ms"] == pytest.approx(np.mean(values))
        assert m[f"median_{name}_ms"] == pytest.approx(np.median(values))
        assert m[f"std_{name}_ms"] == pytest.approx(np.std(values))
        for p, key in ((50.0, "p50"), (90.0, "p90"), (99.9, "p99.9")):
            assert m[f"{key}_{name}_ms"] == pytest.approx(np.percentile(values, p))
    assert m["median_tbt_ms"] == pytest.approx(20.0) and m["median_itl_ms"] == pytest.approx(40.0)
    assert m["p99.9_tbt_ms"] == pytest.approx(np.percentile(tbt_ms, 99.9))
    assert m["p99.9_tbt_ms"] < m["p99.9_itl_ms"]  # the 60 ms chunk gap is three 20 ms tokens
    keys = list(m)
    assert keys.index("p99.9_itl_ms") + 1 == keys.index("mean_tbt_ms")  # right after ITL
    empty = compute_metrics([RequestResult(error="x")], 1.0, [99.0])
    assert empty["mean_tbt_ms"] == 0.0 and empty["p99_tbt_ms"] == 0.0  # as ITL: empty is 0


def test_summary_table_lists_errors():
    from rich.console import Console

    results = [_done(0.05, 0.45, 5), RequestResult(error="HTTP 503: overloaded")]
    config = ServeBenchConfig(max_concurrency=2)
    metrics = compute_metrics(results, 1.0, config.percentiles)
    result = {**metrics, "duration": 1.0, "errors": [r.error for r in results]}
    buffer = io.StringIO()
    print_summary(result, config, Console(file=buffer, width=100))
    text = buffer.getvalue()
    assert "Serving Benchmark Result" in text and "Maximum request concurrency:" in text
    assert "P99 TTFT (ms):" in text and "1 x HTTP 503: overloaded" in text
    assert text.index("P99 ITL (ms):") < text.index("Time between Tokens") < text.index(
        "P99 TBT (ms):"
    )
    assert "(time between tokens: a chunk's gap shared by the tokens it carries)" in text
