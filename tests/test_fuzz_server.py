"""A bounded schemathesis run against a real `sp-serve serve --sp-size 2` on the tiny model.

Every operation in /openapi.json is fuzzed with schema-valid and schema-violating requests
(schemathesis's examples, coverage and fuzzing phases, fixed seed). A case fails on a 5xx, a
response the schema does not describe (status, content type, body, headers), a schema-violating
request that is accepted, a schema-valid request refused for anything but a rule the schema
describes in words (the BUSINESS_RULES below), or an engine that stops serving. A small
--max-model-len keeps every generation short.

SP_SERVE_FUZZ_REPORT=path writes the request count and status mix there as JSON, with the
status of each case of the hostile-input corpus.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.server_proc import Server, start_server

MAX_MODEL_LEN = 64
EXAMPLES_PER_OPERATION = 60
# Refusals of schema-valid requests that the schema states only in words (field descriptions):
# they depend on the prompt's token count, the chat template, or two fields together.
BUSINESS_RULES = (
    "maximum context length",  # prompt + max_tokens > --max-model-len
    "KV blocks per rank",  # the same, against the KV pool
    "The chat template rejected the messages",
    "choices; at most",  # prompts x n > 128
    "stream_options can only be set when stream is true",
    "top_logprobs needs logprobs set to true",
    "best_of other than n",
    "Send exactly one of `prompt` or `messages`",
    "The prompt is empty",  # text that tokenizes to no token
    "must be at most max_tokens",  # min_tokens > max_tokens
    "logit_bias: token id",  # out of the vocabulary
    "cannot be streamed",  # prompt_logprobs with stream on chat
    "json_schema is given exactly when",  # response_format type and json_schema together
    "only one of response_format",  # two ways of asking for structured outputs
    "structured outputs",  # a schema, regex or grammar llguidance refuses; or two of its fields
)
STATUSES: Counter = Counter()
CORPUS_TABLE: list[tuple[str, int]] = []  # (case, status) of the hostile-input corpus


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory) -> Server:
    from sp_serve.model.tiny import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("tiny-fuzz"))
    server = start_server(model, tmp_path_factory.mktemp("logs-fuzz"), "tiny-fuzz",
                          "--max-model-len", str(MAX_MODEL_LEN), "--scheduler", "fcfs",
                          "--kv-cache-memory", "16MiB")
    yield server
    server.stop()
    report = os.environ.get("SP_SERVE_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps({"requests": sum(STATUSES.values()),
                                            "statuses": dict(sorted(STATUSES.items())),
                                            "corpus": CORPUS_TABLE}, indent=1))


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server):
    config = schemathesis.Config.from_dict({"seed": 12, "generation": {"database": "none"}})
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz_the_published_schema(case, fuzz_server):
    # Schema-valid requests are judged below: a 400 is fine for a rule stated in words.
    response = case.call_and_validate(timeout=120, excluded_checks=[positive_data_acceptance])
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, response.text
    if case.meta.generation.mode.is_positive and response.status_code == 400:
        message = response.json()["error"]["message"]
        assert any(rule in message for rule in BUSINESS_RULES), (
            f"a schema-valid request was refused: {message}")
    assert fuzz_server.proc.poll() is None, fuzz_server.log_tail()


# ---- the findings and a corpus of hostile strings through every string field ----------
FINDINGS = [  # in-range sampling values that used to stop the engine (issue 12)
    ("/v1/completions", {"prompt": "\u0017", "top_p": 5e-324}),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 4, "temperature": 1e-40}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                              "top_p": 5e-324}),
]
HOSTILE_STRINGS = {
    "lone-high-surrogate": "a\ud800b", "lone-low-surrogate": "\udfff",
    "swapped-pair": "\udc00\ud800", "nul": "a\u0000b", "controls": "".join(map(chr, range(32))),
    "bom": "\ufeffhi", "noncharacters": "\ufffe\uffff\U0010ffff", "bidi": "\u202eevil\u202c",
    "combining": "e" + "\u0301" * 500, "emoji": "\U0001f600" * 50,
    "special-token-text": "<s></s><|im_start|>", "oversize-100k": "x" * 100_000,
    "oversize-1m": "hello " * 200_000,
}
RAW_BODIES = {  # (path, raw body): what a JSON parser takes, or not
    "nan": ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}'),
    "infinity": ("/v1/completions", b'{"prompt": "hi", "top_p": Infinity}'),
    "overflow": ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1e999}'),
    "huge-int": ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1' + b"0" * 400 + b"}"),
    "deep-nesting": ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "not-json": ("/v1/chat/completions", b"\xff\xfe not json"),
    "empty-body": ("/tokenize", b""),
    "array-body": ("/detokenize", b"[1, 2, 3]"),
}


def _string_placements(text: str) -> list[tuple[str, str, dict]]:
    """(label, path, body) with `text` in each string field of each endpoint."""
    chat = [{"role": "user", "content": "hi"}]
    return [
        ("completions.prompt", "/v1/completions", {"prompt": text, "max_tokens": 2}),
        ("completions.prompt[]", "/v1/completions", {"prompt": ["ok", text], "max_tokens": 2}),
        ("completions.stop", "/v1/completions", {"prompt": "ok", "max_tokens": 2, "stop": [text]}),
        ("completions.model", "/v1/completions", {"prompt": "ok", "model": text}),
        ("completions.user", "/v1/completions", {"prompt": "ok", "max_tokens": 2, "user": text}),
        ("chat.content", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": text}], "max_tokens": 2}),
        ("chat.text-part", "/v1/chat/completions", {"max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "text", "text": text}]}]}),
        ("chat.role", "/v1/chat/completions", {"messages": [{"role": text, "content": "hi"}]}),
        ("chat.name", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi", "name": text}], "max_tokens": 2}),
        ("chat.extra-key", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi", "x": text}], "max_tokens": 2}),
        ("chat.stream", "/v1/chat/completions",
         {"messages": chat, "max_tokens": 2, "stream": True, "stop": text}),
        ("tokenize.prompt", "/tokenize", {"prompt": text}),
        ("tokenize.messages", "/tokenize", {"messages": [{"role": "user", "content": text}]}),
        ("detokenize.model", "/detokenize", {"tokens": [1], "model": text}),
    ]


def test_findings_and_hostile_inputs_never_reach_a_5xx(fuzz_server):
    """Every string the JSON parser accepts tokenizes or gets a 400 that names the field; what
    it does not accept is a 400; the issue's findings are served."""
    table: list[tuple[str, int]] = []
    with httpx.Client(base_url=fuzz_server.url, timeout=120) as http:
        def post(label: str, path: str, content: bytes) -> httpx.Response:
            response = http.post(path, content=content,
                                 headers={"content-type": "application/json"})
            table.append((label, response.status_code))
            assert response.status_code < 500, (label, response.text[:500])
            return response

        for i, (path, body) in enumerate(FINDINGS):
            response = post(f"finding-{i + 1} {path}", path, json.dumps(body).encode())
            assert response.status_code == 200, response.text
        for name, text in HOSTILE_STRINGS.items():
            for label, path, body in _string_placements(text):
                # json.dumps escapes a lone surrogate as \\ud800, as a JSON client sends it.
                response = post(f"{name} in {label}", path, json.dumps(body).encode())
                if response.status_code == 400:  # the message names what to fix
                    error = response.json()["error"]
                    assert error["param"] and len(error["message"]) < 1000, (name, label, error)
        for name, (path, raw) in RAW_BODIES.items():
            assert post(f"raw {name} {path}", path, raw).status_code == 400
    assert httpx.get(fuzz_server.url + "/health", timeout=30).status_code == 200
    CORPUS_TABLE.extend(table)


def test_fuzzed_server_is_healthy_and_idle(fuzz_server):
    """After the run: still serving, nothing left running and no KV held."""
    assert httpx.get(fuzz_server.url + "/health", timeout=30).status_code == 200
    assert fuzz_server.metric("sp_serve:num_requests_running") == 0
    assert fuzz_server.metric("sp_serve:kv_cache_usage_perc") == 0
    assert "Traceback" not in fuzz_server.log.read_text(), fuzz_server.log_tail()
