"""The HTTP frontend against a real uvicorn server and the official openai client.

The engine is tests/fake_engine.py: byte tokens (so "ö" and "✓" are split across tokens), a
canned reply, KV accounting. One server per module; tests that change the engine restore it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

from sp_serve.server.app import build_app
from sp_serve.server.errors import BadRequest
from sp_serve.server.prompts import encode_chat, load_chat_template
from sp_serve.server.stream import IncrementalDetokenizer, StopStringMatcher, TextStream
from tests.fake_engine import FAKE_LOGPROB, FakeEngine, make_byte_tokenizer
from tests.live_app import serve_app

MODEL = "fake-model"
REPLY = FakeEngine.reply
EXTRA = {"sp_size": 2, "tp_size": 4, "attn_backend": "ring", "scheduler": "sarathi",
         "device": "cpu"}


@dataclass
class Served:
    engine: FakeEngine
    url: str
    client: openai.OpenAI
    http: httpx.Client


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(sp_size=EXTRA["sp_size"], tp_size=EXTRA["tp_size"])
    app = build_app(engine, served_model_name=MODEL, extra_model_info=EXTRA)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)
        yield Served(engine, url, client, http)


def engine_requests(engine: FakeEngine, response_id: str):
    return sorted((r for r in engine.requests if r[0].startswith(response_id + "-")),
                  key=lambda r: r[0])


def wait_for(condition, timeout: float = 30.0) -> bool:
    """True once condition() holds; the timeout only means "hung" (generous for a loaded machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def sse_events(lines) -> list:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


# ------------------------------------------------------------------------------ stream.py units


def test_incremental_detokenizer_holds_split_characters():
    tokenizer = make_byte_tokenizer()
    text = "añb✓c"
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer.encode("x"))
    pieces = [detok.add(t) for t in tokenizer.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1:3] == ["", "ñ"]  # the first byte of ñ emits nothing, the second all of it
    # A sequence that ends mid-character: flush gives the replacement char, as the text really is.
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    assert detok.add(0xC3) == "" and detok.flush() == "\ufffd"


@pytest.mark.parametrize("pieces", [["ab", "cSTOPd"], ["abcS", "TO", "Pd"], list("abcSTOPd")])
def test_stop_matcher_truncates_across_pieces(pieces):
    matcher = StopStringMatcher(["STOP", "zz"])
    out, matched = "", None
    for piece in pieces:
        text, matched = matcher.feed(piece)
        out += text
        if matched:
            break
    assert (out, matched) == ("abc", "STOP")


def test_stop_matcher_holds_only_possible_prefixes():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abcST") == ("abc", None)  # "ST" may become STOP: held back
    assert matcher.feed("x") == ("STx", None)  # it did not: released
    assert matcher.feed("S") == ("", None)
    assert matcher.flush() == "S"


def test_text_stream_stop_string_inside_multibyte_text():
    tokenizer = make_byte_tokenizer()
    stream = TextStream(tokenizer, [], ["örl"])
    out = ""
    for t in tokenizer.encode("wörld! more"):
        text, matched = stream.add_token(t)
        out += text
        if matched:
            break
    assert (out, matched) == ("w", "örl")


def test_chat_template_override_file_and_template_errors(tmp_path):
    tokenizer = make_byte_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    ids = encode_chat(tokenizer, messages, load_chat_template(str(path)))
    assert tokenizer.decode(ids) == "[hi]"
    assert load_chat_template("{{ 'inline' }}") == "{{ 'inline' }}"
    with pytest.raises(BadRequest, match="no chat template"):
        encode_chat(make_byte_tokenizer(chat_template=None), messages, None)
    strict = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}"
              "{% endif %}")
    with pytest.raises(BadRequest, match="system first"):
        encode_chat(tokenizer, messages, strict)


# ------------------------------------------------------------------------------------ happy path


def test_models_listing(served):
    models = served.client.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = served.http.get("/v1/models").json()["data"][0]
    assert card["max_model_len"] == served.engine.max_model_len
    assert card["sp_serve"] == EXTRA


def test_completion_text_usage_and_request_ids(served):
    prompt = "Say hi ✓"
    out = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=5,
                                           temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text == REPLY.encode()[:5].decode()
    assert out.choices[0].finish_reason == "length"
    prompt_len = len(prompt.encode())
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        prompt_len, 5, prompt_len + 5)
    [(request_id, prompt_ids, params)] = engine_requests(served.engine, out.id)
    assert request_id == f"{out.id}-0" and len(prompt_ids) == prompt_len
    assert (params.max_tokens, params.temperature, params.n) == (5, 0.0, 1)


def test_default_max_tokens_is_rest_of_context_and_eos_stops(served):
    out = served.client.completions.create(model=MODEL, prompt="abc")
    [(_, _, params)] = engine_requests(served.engine, out.id)
    assert params.max_tokens == served.engine.max_model_len - 3
    # The reply then eos: the whole reply, the eos token counted but not shown.
    assert out.choices[0].text == REPLY and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(REPLY.encode()) + 1


def test_prompt_forms_token_ids_single_list_and_batch(served):
    ids = served.client.completions.create(model=MODEL, prompt=[104, 105], max_tokens=2)
    assert engine_requests(served.engine, ids.id)[0][1] == [104, 105]
    one = served.client.completions.create(model=MODEL, prompt=["hi"], max_tokens=2)
    assert len(one.choices) == 1 and one.usage.prompt_tokens == 2
    batch = served.client.completions.create(model=MODEL, prompt=["a", "bcd"], max_tokens=3)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage.prompt_tokens == 4 and batch.usage.completion_tokens == 6
    assert [r[1] for r in engine_requests(served.engine, batch.id)] == [[97], [98, 99, 100]]


def test_chat_applies_template_and_max_completion_tokens(served):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi ✓"}]
    out = served.client.chat.completions.create(model=MODEL, messages=messages,
                                                max_completion_tokens=12)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == REPLY.encode()[:12].decode()
    # The reference is ChatML written out by hand (not the template the server calls): the
    # markers are special tokens, everything else one token per UTF-8 byte.
    tok = served.engine.tokenizer
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    expected = [start, *b"system\nbe brief", end, *b"\n", start, *"user\nhi ✓".encode(), end,
                *b"\n", start, *b"assistant\n"]
    [(_, prompt_ids, params)] = engine_requests(served.engine, out.id)
    assert prompt_ids == list(expected) and params.max_tokens == 12
    assert out.usage.prompt_tokens == len(expected)


def test_chat_stream_role_first_usage_last_then_done(served):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
            "stream": True, "stream_options": {"include_usage": True}}
    with served.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk, content_chunks = chunks[-1], chunks[1:-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 20
    assert content_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content_chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content_chunks)
    assert text == REPLY.encode()[:20].decode()
    # One event per engine step, except the step that produced half of "ö" (nothing to say).
    assert len(content_chunks) == 19 and "\ufffd" not in text


def test_completion_stream_with_openai_client(served):
    stream = served.client.completions.create(model=MODEL, prompt="x", max_tokens=16,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    text = "".join(c.choices[0].text for c in chunks[:-1])
    assert text == REPLY.encode()[:16].decode()
    assert chunks[-2].choices[0].finish_reason == "length"


def test_n2_fans_out_with_request_ids_and_seeds(served):
    out = served.client.completions.create(model=MODEL, prompt="x", max_tokens=6, n=2, seed=7,
                                           temperature=0.8)
    requests = engine_requests(served.engine, out.id)
    assert [r[0] for r in requests] == [f"{out.id}-0", f"{out.id}-1"]
    assert [r[2].seed for r in requests] == [7, 8]
    assert sorted(c.index for c in out.choices) == [0, 1]
    texts = {c.index: c.text for c in out.choices}
    # The fake rotates its reply by `seed` characters; 6 byte tokens.
    assert texts == {i: (REPLY[7 + i:] + REPLY[:7 + i]).encode()[:6].decode() for i in (0, 1)}
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == 1
    stream = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4, n=2,
        stream=True)
    by_choice = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            by_choice[choice.index] += choice.delta.content or ""
    assert by_choice == {0: REPLY[:4], 1: REPLY[:4]}


def test_stop_string_truncates_and_aborts_engine_request(served):
    out = served.client.completions.create(model=MODEL, prompt="x", max_tokens=200,
                                           stop=["fox", "zzz"])
    choice = out.choices[0]
    assert choice.text == REPLY[:REPLY.index("fox")]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == "fox"
    assert f"{out.id}-0" in served.engine.aborted
    assert wait_for(lambda: served.engine.kv_usage == 0)
    # Streaming: nothing of the stop string ever leaves the server, even split over chunks.
    stream = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True, stop="wörld!")
    chunks = [c.choices[0] for c in stream]
    assert "".join(c.delta.content or "" for c in chunks) == "Hello, "
    assert chunks[-1].finish_reason == "stop"


def test_include_stop_str_and_min_tokens_for_stop_strings(served):
    """vLLM's include_stop_str_in_output keeps the matched stop string; before min_tokens tokens
    stop strings do not count (the fake reply is "Hello, wörld! ...", a byte per token)."""
    out = served.client.completions.create(model=MODEL, prompt="x", max_tokens=100, stop="wö",
                                           extra_body={"include_stop_str_in_output": True})
    assert out.choices[0].text == "Hello, wö" and out.choices[0].finish_reason == "stop"
    stream = served.client.completions.create(
        model=MODEL, prompt="x", max_tokens=100, stop="l", stream=True,
        extra_body={"min_tokens": 5, "include_stop_str_in_output": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == "Hello, wörl"
    out = served.client.completions.create(model=MODEL, prompt="x", max_tokens=100, stop="l",
                                           extra_body={"min_tokens": 3})
    assert out.choices[0].text == "He"  # the first "l" is token 3: it counts
    [(_, _, params)] = engine_requests(served.engine, out.id)
    assert params.min_tokens == 3


def test_continuous_usage_stats(served):
    stream = served.client.completions.create(
        model=MODEL, prompt="xy", max_tokens=4, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    usages = [(c.usage.prompt_tokens, c.usage.completion_tokens) for c in chunks]
    assert usages[:4] == [(2, 1), (2, 2), (2, 3), (2, 4)] and usages[-1] == (2, 4)
    assert not chunks[-1].choices  # the final usage-only chunk, as without continuous stats
    stream = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert all(c.usage is not None for c in stream)


def test_continuous_usage_counts_the_tokens_streamed_so_far_not_those_queued():
    """Updates already queued when a chunk is formatted (the engine ran ahead of the stream) do
    not count in that chunk's usage; a token whose text is held back (no chunk of its own)
    counts with the next chunk."""
    import asyncio
    import json as _json
    from types import SimpleNamespace
    from typing import Any

    from pydantic import BaseModel

    from sp_serve.server.serving import _sse

    updates = [SimpleNamespace(token_ids=[1], text="a"), SimpleNamespace(token_ids=[2], text=""),
               SimpleNamespace(token_ids=[3, 4], text="bc")]

    class Group:
        prompt_tokens, completion_tokens, cached_tokens = 5, 4, 0  # every update already in

        async def updates(self):
            for u in updates:
                yield u

        async def close(self):
            pass

    class Chunk(BaseModel):
        text: str
        usage: Any = None

    class Formatter:
        def prelude(self):
            return []

        def chunk(self, update):
            return Chunk(text=update.text) if update.text else None

    async def run():
        return [e async for e in _sse(Group(), Formatter(), False, True)]

    events = [e for e in asyncio.run(run()) if e.startswith("data: {")]
    sent = [_json.loads(e[len("data: "):]) for e in events]
    assert [(c["text"], c["usage"]["completion_tokens"]) for c in sent] == [("a", 1), ("bc", 4)]


def test_ignored_fields_are_accepted_and_listed_in_one_place(served):
    from sp_serve.server.protocol import IGNORED_FIELDS
    body = {**_COMPLETION, "max_tokens": 2, "user": "u", "metadata": {"k": "v"}, "store": False,
            "service_tier": "auto", "prompt_cache_key": "c", "safety_identifier": "s"}
    assert served.http.post("/v1/completions", json=body).status_code == 200
    chat = {**_CHAT, "max_tokens": 2, "parallel_tool_calls": True, "user": "u"}
    assert served.http.post("/v1/chat/completions", json=chat).status_code == 200
    assert set(body) - {"model", "prompt", "max_tokens"} | {"parallel_tool_calls"} == set(
        IGNORED_FIELDS)
    schema = served.http.get("/openapi.json").json()["components"]["schemas"]
    assert schema["CompletionRequest"]["additionalProperties"] is False
    user = schema["CompletionRequest"]["properties"]["user"]
    assert "Accepted and ignored" in user["description"]


def test_stop_token_ids(served):
    out = served.client.completions.create(model=MODEL, prompt="x", max_tokens=100,
                                           extra_body={"stop_token_ids": [ord("!")]})
    assert out.choices[0].text == "Hello, wörld!"
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == ord("!")


def test_completion_logprobs_shape(served):
    out = served.client.completions.create(model=MODEL, prompt="x", max_tokens=10, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 10
    assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == 10
    assert logprobs.token_logprobs == [FAKE_LOGPROB] * 10
    assert all(top[tok] == FAKE_LOGPROB for top, tok in zip(logprobs.top_logprobs, logprobs.tokens))
    # Two entries each, except where the halves of "ö" and their neighbours all print as U+FFFD.
    assert [len(top) for top in logprobs.top_logprobs] == [2] * 8 + [1] * 2
    assert logprobs.text_offset[:3] == [0, 1, 2]
    [(_, _, params)] = engine_requests(served.engine, out.id)
    assert params.logprobs == 2


def test_chat_logprobs_shape(served):
    out = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5, logprobs=True,
        top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == list("Hello")
    assert all(c.logprob == FAKE_LOGPROB and len(c.top_logprobs) == 3 for c in content)
    assert content[0].bytes == [ord("H")]
    plain = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_tokenize_detokenize_round_trip(served):
    text = "héllo ✓ wörld"
    tokens = served.http.post("/tokenize", json={"prompt": text}).json()
    assert tokens["tokens"] == list(text.encode())
    assert tokens["count"] == len(text.encode())
    assert tokens["max_model_len"] == served.engine.max_model_len
    back = served.http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back == {"prompt": text}
    chat = served.http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert served.engine.tokenizer.decode(chat.json()["tokens"]).endswith(
        "<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------- errors

_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
_COMPLETION = {"model": MODEL, "prompt": "hi"}

BAD_REQUESTS = [
    # (id, path, body or raw bytes, param, a phrase from the message)
    ("malformed-json", "/v1/completions", b'{"model": "fake-model", "prompt": ', None,
     "not valid JSON"),
    ("body-not-object", "/v1/completions", b"[1, 2]", None, "dictionary"),
    ("temperature-negative", "/v1/completions", {**_COMPLETION, "temperature": -1}, "temperature",
     "greater than or equal to 0"),
    ("top-p-2", "/v1/chat/completions", {**_CHAT, "top_p": 2}, "top_p", "less than or equal to 1"),
    ("max-tokens-0", "/v1/completions", {**_COMPLETION, "max_tokens": 0}, "max_tokens",
     "greater than or equal to 1"),
    ("max-tokens-wrong-type", "/v1/completions", {**_COMPLETION, "max_tokens": "ten"},
     "max_tokens", "valid integer"),
    ("n-too-big", "/v1/completions", {**_COMPLETION, "n": 1000}, "n", "less than or equal to 128"),
    ("prompt-wrong-type", "/v1/completions", {**_COMPLETION, "prompt": {"text": "hi"}}, "prompt",
     "must be a string"),
    ("prompt-missing", "/v1/completions", {"model": MODEL}, "prompt", "Field required"),
    ("empty-prompt", "/v1/completions", {**_COMPLETION, "prompt": ""}, "prompt", "empty"),
    ("empty-token-list", "/v1/completions", {**_COMPLETION, "prompt": []}, "prompt", "empty"),
    ("out-of-vocab", "/v1/completions", {**_COMPLETION, "prompt": [1, 99999]}, "prompt",
     "out of vocabulary"),
    ("stop-wrong-type", "/v1/completions", {**_COMPLETION, "stop": [1]}, "stop.0", "valid string"),
    ("logprobs-too-many", "/v1/completions", {**_COMPLETION, "logprobs": 21}, "logprobs",
     "less than or equal to 20"),
    ("no-messages", "/v1/chat/completions", {**_CHAT, "messages": []}, "messages", "at least 1"),
    ("image-part", "/v1/chat/completions",
     {**_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content", "only text"),
    ("top-logprobs-without-logprobs", "/v1/chat/completions", {**_CHAT, "top_logprobs": 2},
     "top_logprobs", "logprobs set to true"),
    ("stream-options-without-stream", "/v1/chat/completions",
     {**_CHAT, "stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ("penalty", "/v1/chat/completions", {**_CHAT, "presence_penalty": 2.5}, "presence_penalty",
     "less than or equal to 2"),
    ("repetition-penalty-0", "/v1/completions", {**_COMPLETION, "repetition_penalty": 0},
     "repetition_penalty", "greater than 0"),
    ("min-p-2", "/v1/completions", {**_COMPLETION, "min_p": 2}, "min_p",
     "less than or equal to 1"),
    ("logit-bias-range", "/v1/completions", {**_COMPLETION, "logit_bias": {"1": 500}},
     "logit_bias.1", "less than or equal to 100"),
    ("logit-bias-key", "/v1/completions", {**_COMPLETION, "logit_bias": {"a": 5}},
     "logit_bias.a.[key]", "should match pattern"),
    ("suffix", "/v1/completions", {**_COMPLETION, "suffix": "x"}, "suffix", "not supported"),
    ("min-tokens-above-max", "/v1/completions", {**_COMPLETION, "max_tokens": 2,
                                                 "min_tokens": 3}, "min_tokens", "at most"),
    # nothing is silently ignored: an unknown or unimplemented field is a 400 naming it
    ("unknown-field", "/v1/completions", {**_COMPLETION, "use_beam_search": True},
     "use_beam_search", "unknown field"),
    ("unknown-chat-field", "/v1/chat/completions", {**_CHAT, "chat_template_kwargs": {}},
     "chat_template_kwargs", "unknown field"),
    ("unknown-stream-option", "/v1/chat/completions",
     {**_CHAT, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x", "unknown field"),
    ("chat-echo", "/v1/chat/completions", {**_CHAT, "echo": True}, "echo", "unknown field"),
    # JSON as Python parses it carries NaN and Infinity: they are not numbers to sample with.
    ("temperature-nan", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}',
     "temperature", "finite number"),
    ("top-p-infinity", "/v1/completions", b'{"prompt": "hi", "top_p": -Infinity}', "top_p",
     "finite number"),
    ("temperature-overflow", "/v1/completions", b'{"prompt": "hi", "temperature": 1e999}',
     "temperature", "finite number"),
    # No loose coercion: a string is not a boolean, false is not a token id.
    ("stream-yes", "/v1/completions", {**_COMPLETION, "stream": "yes"}, "stream",
     "valid boolean"),
    ("max-tokens-fraction", "/v1/completions", {**_COMPLETION, "max_tokens": 4.5}, "max_tokens",
     "valid integer"),
    ("detokenize-false", "/detokenize", {"tokens": [False]}, "tokens.0", "valid integer"),
    ("prompt-bool-ids", "/v1/completions", {**_COMPLETION, "prompt": [True, 2]}, "prompt",
     "must be a string"),
    ("negative-token-id", "/v1/completions", {**_COMPLETION, "prompt": [3, -1]}, "prompt",
     ">= 0"),
    # A lone UTF-16 surrogate: valid JSON, but no tokenizer can encode it.
    ("surrogate-prompt", "/v1/completions", {**_COMPLETION, "prompt": "a\ud800b"}, "prompt",
     "lone UTF-16 surrogate"),
    ("surrogate-prompt-list", "/v1/completions", {**_COMPLETION, "prompt": ["ok", "\udfff"]},
     "prompt", "lone UTF-16 surrogate"),
    ("surrogate-tokenize", "/tokenize", {"prompt": "a\ud800b"}, "prompt",
     "lone UTF-16 surrogate"),
    ("surrogate-content", "/v1/chat/completions",
     {**_CHAT, "messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content",
     "lone UTF-16 surrogate"),
    ("surrogate-stop", "/v1/completions", {**_COMPLETION, "stop": ["\ud800"]}, "stop.0",
     "unicode string"),
    ("unknown-role", "/v1/chat/completions", {**_CHAT, "messages": [{"role": "wizard",
                                                                      "content": "hi"}]},
     "messages.0.role", "Input should be"),
    ("empty-prompt-in-list", "/v1/completions", {**_COMPLETION, "prompt": ["a", ""]}, "prompt",
     "empty"),
    ("tokenize-neither", "/tokenize", {}, "prompt", "exactly one"),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [5000]}, "tokens", "out of vocabulary"),
]


@pytest.mark.parametrize("path,body,param,phrase", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_is_400_in_openai_envelope(served, path, body, param, phrase):
    # json.dumps escapes a lone surrogate as "\\ud800", as a JSON client may send it.
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = served.http.post(path, content=content,
                                headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert error["param"] == param
    assert phrase in error["message"]


def test_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError) as info:
        served.client.chat.completions.create(model="gpt-4", messages=[{"role": "user",
                                                                         "content": "hi"}])
    assert info.value.body["type"] == "NotFoundError" and info.value.body["param"] == "model"
    assert "`gpt-4` does not exist" in info.value.body["message"]


def test_over_context_messages_use_vllm_wording(served):
    max_len = served.engine.max_model_len
    with pytest.raises(openai.BadRequestError) as info:
        served.client.completions.create(model=MODEL, prompt="x" * 500, max_tokens=100)
    assert info.value.body["message"] == (
        f"This model's maximum context length is {max_len} tokens. However, you requested 600 "
        "tokens (500 in the messages, 100 in the completion). Please reduce the length of the "
        "messages or completion.")
    with pytest.raises(openai.BadRequestError) as info:
        served.client.completions.create(model=MODEL, prompt=[1] * max_len)
    assert info.value.body["message"] == (
        f"This model's maximum context length is {max_len} tokens. However, your request has "
        f"{max_len} input tokens. Please reduce the length of the input messages.")
    # The client's own validation error type, not a generic status error.
    with pytest.raises(openai.BadRequestError):
        served.client.completions.create(model=MODEL, prompt="x", temperature=-1)


@pytest.mark.parametrize("stream", [False, True])
def test_engine_value_error_before_first_token_is_400(served, stream):
    served.engine.kv_capacity_tokens = 50
    try:
        response = served.http.post("/v1/completions", json={**_COMPLETION, "max_tokens": 100,
                                                             "stream": stream})
    finally:
        served.engine.kv_capacity_tokens = 100_000
    assert response.status_code == 400
    assert "does not fit the KV cache" in response.json()["error"]["message"]


def test_engine_crash_is_500_or_error_event(served):
    served.engine.crash_after_tokens = 3
    try:
        response = served.http.post("/v1/completions", json={**_COMPLETION, "max_tokens": 10})
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "InternalServerError"
        with served.http.stream("POST", "/v1/completions",
                                json={**_COMPLETION, "max_tokens": 10, "stream": True}) as r:
            events = sse_events(r.iter_lines())
    finally:
        served.engine.crash_after_tokens = None
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == 500
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2]) == "Hel"


def test_engine_death_mid_request_is_503(served):
    served.engine.crash_after_tokens, served.engine.crash_kills = 2, True
    try:
        response = served.http.post("/v1/completions", json={**_COMPLETION, "max_tokens": 10})
    finally:
        served.engine.crash_after_tokens, served.engine.crash_kills = None, False
        served.engine.healthy = True
    assert response.status_code == 503
    assert "The engine stopped" in response.json()["error"]["message"]


def test_unknown_route_is_404_envelope(served):
    response = served.http.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == 404


def test_wrong_method_is_405_with_allow(served):
    response = served.http.get("/v1/completions")
    assert response.status_code == 405 and response.json()["error"]["code"] == 405
    assert response.headers["allow"] == "POST"


def test_error_messages_clip_what_they_echo(served):
    name = "m" * 100_000
    response = served.http.post("/v1/completions", json={**_COMPLETION, "model": name})
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert len(message) < 200 and "(100000 characters)" in message
    response = served.http.post("/v1/completions", json={**_COMPLETION, "max_tokens": "9" * 5000})
    assert response.status_code == 400 and len(response.json()["error"]["message"]) < 200


def test_schema_valid_edge_requests_are_served(served):
    """What the published schema allows is served, not refused."""
    bodies = [
        ("/v1/chat/completions", {**_CHAT, "top_logprobs": 0}),  # 0 needs no logprobs
        ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "system"},
                                                        {"role": "user", "content": None},
                                                        {"role": "assistant", "content": []}]}),
        ("/v1/chat/completions", {**_CHAT, "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "a"}]},
            {"role": "tool", "content": "b", "tool_call_id": "x"}]}),
        ("/v1/completions", {**_COMPLETION, "logit_bias": {}, "echo": False, "suffix": "",
                             "min_p": 0.5, "repetition_penalty": 1.2, "frequency_penalty": -2}),
        ("/v1/completions", {**_COMPLETION, "prompt": "\u0000\u0017\U0001f600"}),
        ("/v1/completions", {**_COMPLETION, "prompt": [104.0, 105], "n": 2.0}),  # JSON integers
        ("/tokenize", {"prompt": ""}),
        ("/detokenize", {"tokens": []}),
    ]
    for path, body in bodies:
        response = served.http.post(path, json={**body, "max_tokens": 2} if "v1" in path else body)
        assert response.status_code == 200, (body, response.text)
    chat = served.engine.tokenizer.decode(served.http.post("/tokenize", json={
        "messages": [{"role": "assistant"}]}).json()["tokens"])
    assert chat.startswith("<|im_start|>assistant\n<|im_end|>")  # no content: empty text


def test_sampling_fields_reach_the_engine(served):
    out = served.client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=-0.5, extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1})
    [(_, _, params)] = engine_requests(served.engine, out.id)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.7, 0.9, 5, 0.1)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (
        0.5, -0.5, 1.1)


def test_openapi_tells_the_statuses_and_bodies_served(served):
    schema = served.http.get("/openapi.json").json()
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            if "requestBody" in operation:
                assert responses["400"]["content"]["application/json"]["schema"] == error_ref
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"404", "500", "503"} <= set(completions)
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    health = schema["paths"]["/health"]["get"]["responses"]
    assert not health["200"].get("content") and "503" in health
    # Bounds of the model being served: its name, its vocabulary.
    request = schema["components"]["schemas"]["DetokenizeRequest"]["properties"]
    assert request["model"]["anyOf"][0]["enum"] == [MODEL]
    assert request["tokens"]["items"]["maximum"] == len(served.engine.tokenizer) - 1
    roles = schema["components"]["schemas"]["ChatMessage"]["properties"]["role"]["enum"]
    assert set(roles) == {"system", "developer", "user", "assistant", "tool"}


# ------------------------------------------------------------------------------ disconnect abort


def test_disconnect_mid_stream_aborts_and_frees_kv(served):
    engine = served.engine
    body = {**_COMPLETION, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=served.url, timeout=10) as http, \
            http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert engine.kv_usage > 0
    request_id = first["id"] + "-0"
    assert wait_for(lambda: request_id in engine.aborted), "engine.abort was not called"
    assert wait_for(lambda: engine.kv_usage == 0 and request_id in engine.finished)
    reason, generated = engine.finished[request_id]
    assert reason == "abort" and generated < 400


def test_disconnect_while_waiting_for_non_streaming_response_aborts(served):
    engine = served.engine
    before = {r[0] for r in engine.requests}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/completions", timeout=0.3,
                   json={**_COMPLETION, "max_tokens": 400, "ignore_eos": True})
    [request_id] = [r[0] for r in engine.requests if r[0] not in before]
    assert wait_for(lambda: request_id in engine.aborted), "engine.abort was not called"
    assert wait_for(lambda: engine.kv_usage == 0 and request_id in engine.finished)
    assert engine.finished[request_id][1] < 400


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_during_long_prefill_aborts_at_once(served, stream):
    """The long-prompt case: a client that gives up during a minutes-long prefill."""
    engine = served.engine
    before = {r[0] for r in engine.requests}
    # A prefill that never ends by itself: the request can only finish by being aborted.
    engine.prefill_s = 3600.0
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + "/v1/completions", timeout=0.2,
                       json={**_COMPLETION, "max_tokens": 5, "stream": stream})
        assert wait_for(lambda: len(engine.requests) > len(before))
        [request_id] = [r[0] for r in engine.requests if r[0] not in before]
        assert wait_for(lambda: request_id in engine.finished, timeout=60.0)
        assert request_id in engine.aborted
        assert engine.finished[request_id] == ("abort", 0)  # during the prefill, no token out
    finally:
        engine.prefill_s = FakeEngine.prefill_s


# --------------------------------------------------------------------------- health and metrics


def test_health_turns_503_when_engine_dies(served):
    assert served.http.get("/health").status_code == 200
    served.engine.healthy = False
    try:
        assert served.http.get("/health").status_code == 503
        response = served.http.post("/v1/completions", json=_COMPLETION)
        assert response.status_code == 503 and response.json()["error"]["code"] == 503
    finally:
        served.engine.healthy = True
    assert served.http.get("/health").status_code == 200


def _samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_names_and_counters_move(served):
    label = f'model_name="{MODEL}"'
    before = _samples(served.http.get("/metrics").text)
    served.client.completions.create(model=MODEL, prompt="abcd", max_tokens=7)
    served.engine.num_preemptions = 3
    try:
        response = served.http.get("/metrics")
    finally:
        served.engine.num_preemptions = 0
    assert response.headers["content-type"].startswith("text/plain")
    after = _samples(response.text)
    for name in ["time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"]:
        key = f"sp_serve:{name}_count{{{label}}}"
        assert after[key] >= before.get(key, 0) + 1, name
    for name in ["kv_cache_usage_perc", "num_requests_running", "num_requests_waiting"]:
        assert f"sp_serve:{name}{{{label}}}" in after, name
    # the engine's layout, beside its KV cache's (vLLM's cache_config_info)
    (info,) = [k for k in after if k.startswith("sp_serve:cache_config_info{")]
    assert 'sp_size="2"' in info and 'tp_size="4"' in info and after[info] == 1.0

    def moved(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert moved(f"sp_serve:prompt_tokens_total{{{label}}}") == 4
    assert moved(f"sp_serve:generation_tokens_total{{{label}}}") == 7
    assert moved(f'sp_serve:request_success_total{{finished_reason="length",{label}}}') == 1
    assert after[f"sp_serve:num_preemptions_total{{{label}}}"] == 3


# What vLLM's Grafana dashboard (examples/online_serving/prometheus_grafana/grafana.json) queries,
# with its prefix replaced: every panel gets data once a request has finished.
GRAFANA_SERIES = [
    "e2e_request_latency_seconds_bucket", "e2e_request_latency_seconds_sum",
    "e2e_request_latency_seconds_count", "prompt_tokens_total", "generation_tokens_total",
    "time_per_output_token_seconds_bucket", "time_per_output_token_seconds_sum",
    "time_per_output_token_seconds_count", "num_requests_running", "num_requests_waiting",
    "time_to_first_token_seconds_bucket", "time_to_first_token_seconds_sum",
    "time_to_first_token_seconds_count", "gpu_cache_usage_perc",
    "request_prompt_tokens_bucket", "request_generation_tokens_bucket", "request_success_total",
    "request_queue_time_seconds_sum", "request_prefill_time_seconds_sum",
    "request_decode_time_seconds_sum", "request_max_num_generation_tokens_sum",
]


def test_vllm_request_histograms_and_grafana_series(served):
    served.client.completions.create(model=MODEL, prompt="abcd", max_tokens=7, n=2)
    text = served.http.get("/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    missing = [n for n in GRAFANA_SERIES if f"sp_serve:{n}" not in names]
    assert not missing, missing
    samples = _samples(text)
    label = f'model_name="{MODEL}"'
    for name in ["request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens", "request_params_n", "request_params_max_tokens",
                 "time_per_output_token_seconds", "request_max_num_generation_tokens"]:
        assert samples[f"sp_serve:{name}_count{{{label}}}"] >= 1, name
    assert f"sp_serve:iteration_tokens_total_count{{{label}}}" in samples
    # vLLM's buckets: 1-2-5 up to max_model_len (512) for token counts, [1, 2, 5, 10, 20] for n
    les = [k for k in samples if k.startswith("sp_serve:request_prompt_tokens_bucket")]
    assert sorted(float(k.split('le="')[1].split('"')[0]) for k in les) == [
        1, 2, 5, 10, 20, 50, 100, 200, 500, float("inf")]
    assert samples[f'sp_serve:request_params_n_bucket{{le="2.0",{label}}}'] >= 1
