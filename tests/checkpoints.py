"""Random float32 Hugging Face checkpoints for tests, written by transformers itself.

`CHECKPOINT_CASES` covers the shapes and config spellings sp-serve must read: GQA / MHA / MQA,
q/k/v bias (Qwen2; Llama attention_bias also biases o_proj), tied embeddings, explicit head_dim
differing from hidden/heads, sharded safetensors, and every RoPE scaling type in both config
spellings. Scaled RoPE cases use a small pretraining length (64) so a ~300-token prompt runs
past it, and every case allows at least 512 tokens (ModelSpec.max_model_len).

Usage: `for name, kwargs in CHECKPOINT_CASES: write_hf_checkpoint(tmp / name, **kwargs)`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sp_serve.model.tiny import build_hf_model

_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}
_YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}

# (name, kwargs for write_hf_checkpoint)
CHECKPOINT_CASES: list[tuple[str, dict[str, Any]]] = [
    ("llama-gqa", dict(arch="llama")),
    ("llama-mha", dict(arch="llama", num_key_value_heads=4)),
    ("llama-mqa-bias", dict(arch="llama", num_key_value_heads=1, attention_bias=True)),
    ("qwen2-bias-tied", dict(arch="qwen2", tie_word_embeddings=True)),
    ("mistral-head-dim", dict(arch="mistral", head_dim=32)),
    ("llama-sharded", dict(arch="llama", max_shard_size="20KB")),
    # Llama-2 era spelling: rope_scaling with "type", rope_theta and torch_dtype top-level
    ("llama-linear-scaling", dict(arch="llama", spelling="rope_scaling",
                                  rope={"rope_type": "linear", "factor": 2.0})),
    # HF's dynamic NTK threshold is max_position_embeddings itself
    ("llama-dynamic-scaling", dict(arch="llama", spelling="rope_scaling",
                                   max_position_embeddings=64,
                                   rope={"rope_type": "dynamic", "factor": 8.0})),
    ("qwen2-dynamic-params", dict(arch="qwen2", max_position_embeddings=64,
                                  rope={"rope_type": "dynamic", "factor": 8.0})),
    ("llama-yarn-params", dict(arch="llama", max_position_embeddings=512, rope=_YARN)),
    # Qwen2.5 long-context spelling
    ("qwen2-yarn-scaling", dict(arch="qwen2", spelling="rope_scaling", max_position_embeddings=512,
                                rope=_YARN)),
    # Llama-3.1 spelling (rope_theta 500000 top-level)
    ("llama3-scaling", dict(arch="llama", spelling="rope_scaling", max_position_embeddings=512,
                            rope={**_LLAMA3, "rope_theta": 500000.0})),
    # head_dim 16 with 8 heads of a 64-wide model (hidden/heads would be 8)
    ("llama3-params-head-dim", dict(arch="llama", max_position_embeddings=512, head_dim=16,
                                    num_attention_heads=8, num_key_value_heads=2, rope=_LLAMA3)),
]


def _respell_config(config_file: Path, legacy_type_key: bool) -> None:
    """Rewrites transformers-5 `rope_parameters` as `rope_scaling` + top-level `rope_theta`."""
    config = json.loads(config_file.read_text())
    params = dict(config.pop("rope_parameters"))
    config["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    if rope_type == "default":
        config["rope_scaling"] = None
    else:
        config["rope_scaling"] = {("type" if legacy_type_key else "rope_type"): rope_type, **params}
    config["torch_dtype"] = config.pop("dtype")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def write_hf_checkpoint(out_dir: str | Path, arch: str = "llama", *, seed: int = 0,
                        spelling: str = "rope_parameters", rope: dict | None = None,
                        max_shard_size: str | None = None, **config_overrides: Any) -> Path:
    """Writes a random float32 checkpoint (config.json, safetensors, generation_config.json).

    spelling: "rope_parameters" (transformers 5) or "rope_scaling" (older; linear RoPE also
    uses the old "type" key there). rope: RoPE params without rope_theta unless overriding it.
    """
    if spelling not in ("rope_parameters", "rope_scaling"):
        raise ValueError(f"spelling must be 'rope_parameters' or 'rope_scaling', got {spelling!r}")
    if rope is not None:
        config_overrides["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    out_dir = Path(out_dir)
    model = build_hf_model(arch, seed, **config_overrides)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **save_kwargs)
    if spelling == "rope_scaling":
        rope_type = model.config.rope_parameters["rope_type"]
        _respell_config(out_dir / "config.json", legacy_type_key=rope_type == "linear")
    return out_dir
