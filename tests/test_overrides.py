"""--hf-overrides: the merge itself, and the overridden model against HF transformers loaded
with the same merged config, past the checkpoint's trained length."""
from __future__ import annotations

import json

import pytest
import torch

from sp_serve.config import EngineConfig
from sp_serve.engine.engine import LLMEngine
from sp_serve.model import load_model, load_spec
from sp_serve.model.overrides import apply_hf_overrides, parse_hf_overrides
from sp_serve.model.spec import load_hf_config
from tests.test_model import causal_attention, rel_err

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
LEGACY = {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5e5, "max_position_embeddings": 64}
MODERN = {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "max_position_embeddings": 64}


@pytest.mark.parametrize("raw", [LEGACY, MODERN], ids=["rope_scaling-config", "rope_parameters-config"])
@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_either_spelling_replaces_either_spelling_keeping_theta(raw, key):
    merged = apply_hf_overrides(raw, {key: YARN})
    assert "rope_scaling" not in merged
    assert merged["rope_parameters"] == {**YARN, "rope_theta": 5e5}
    assert raw == (LEGACY if "rope_scaling" in raw else MODERN)  # the input is not modified


def test_other_merges():
    old_type_key = apply_hf_overrides(MODERN, {"rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert old_type_key["rope_parameters"] == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}
    off = apply_hf_overrides(LEGACY, {"rope_scaling": None})
    assert off["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e5}
    theta = apply_hf_overrides(MODERN, {"rope_theta": 1e6, "max_position_embeddings": 128})
    assert theta["rope_parameters"]["rope_theta"] == 1e6 and theta["max_position_embeddings"] == 128
    assert apply_hf_overrides(MODERN, None) is MODERN
    with pytest.raises(ValueError, match="not both"):
        apply_hf_overrides(MODERN, {"rope_scaling": YARN, "rope_parameters": YARN})
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_hf_overrides("[1, 2]")
    with pytest.raises(ValueError, match="rope_scaling must be an object"):
        parse_hf_overrides('{"rope_scaling": "yarn"}')
    with pytest.raises(ValueError, match="must be a JSON object"):
        EngineConfig(model="m", hf_overrides=["rope_scaling"])


@pytest.mark.parametrize("name, override", [
    ("llama-gqa", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 64}}),
    ("qwen2-bias-tied", {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0},
                         "max_position_embeddings": 64}),
    ("llama-linear-scaling", {"rope_scaling": {
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
])
def test_overridden_model_matches_hf_with_the_same_config(hf_checkpoint, name, override):
    from transformers import AutoModelForCausalLM

    path = hf_checkpoint(name)
    model, spec = load_model(path, hf_overrides=override)
    assert spec.rope_type == next(iter(override.values()))["rope_type"]
    hf = AutoModelForCausalLM.from_pretrained(path, config=load_hf_config(path, override),
                                              dtype=torch.float32).eval()
    n = 150  # past the 64 tokens the override says the model was trained on
    ids = torch.randint(0, spec.vocab_size, (n,), generator=torch.Generator().manual_seed(3))
    def last_logits(m):
        with torch.no_grad():
            return m.compute_logits(m(ids, torch.arange(n), causal_attention(spec, n))[-1:])[0]

    ours = last_logits(model)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0, -1]
    assert rel_err(ours, ref) < 1e-4
    assert rel_err(last_logits(load_model(path)[0]), ours) > 1e-3  # the override did change it


def test_max_model_len_follows_the_override(hf_checkpoint):
    path = hf_checkpoint("llama-gqa")  # max_position_embeddings 4096
    assert load_spec(path).max_model_len == 4096
    yarn = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}}
    assert load_spec(path, yarn).max_model_len == 16384
    with pytest.raises(ValueError) as err:  # fails before any rank starts
        LLMEngine(EngineConfig(model=str(path), max_model_len=20000, hf_overrides=yarn))
    hint = json.loads(str(err.value).split("--hf-overrides '")[1].rstrip("'"))
    assert "exceeds the model's context (16384 tokens)" in str(err.value)
    yarn5 = {"rope_type": "yarn", "factor": 5.0, "original_max_position_embeddings": 4096}
    assert hint == {"rope_scaling": yarn5, "max_position_embeddings": 20480}
