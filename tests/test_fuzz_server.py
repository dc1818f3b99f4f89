"""A bounded schemathesis run against a real `sp-serve serve --sp-size 2` on the tiny model.

Every operation in /openapi.json is fuzzed with schema-valid and schema-violating requests
(schemathesis's examples, coverage and fuzzing phases, fixed seed). A case fails on a 5xx, a
response the schema does not describe (status, content type, body, headers), a schema-violating
request that is accepted, a schema-valid request refused for anything but a rule the schema
describes in words (the BUSINESS_RULES below), or an engine that stops serving. A small
--max-model-len keeps every generation short.

SP_SERVE_FUZZ_REPORT=path writes the request count and status mix there as JSON.
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
)
STATUSES: Counter = Counter()


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
                                            "statuses": dict(sorted(STATUSES.items()))}))


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


def test_fuzzed_server_is_healthy_and_idle(fuzz_server):
    """After the run: still serving, nothing left running and no KV held."""
    assert sum(STATUSES.values()) > 0
    assert httpx.get(fuzz_server.url + "/health", timeout=30).status_code == 200
    assert fuzz_server.metric("sp_serve:num_requests_running") == 0
    assert fuzz_server.metric("sp_serve:kv_cache_usage_perc") == 0
    assert "Traceback" not in fuzz_server.log.read_text(), fuzz_server.log_tail()
