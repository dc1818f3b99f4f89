"""ModelSpec: everything the model, the loader and the engine need to know about a checkpoint.

`load_spec` reads a Hugging Face checkpoint directory. transformers' `AutoConfig` parses
config.json, so both RoPE spellings (`rope_scaling` + top-level `rope_theta`, as Llama-3.1 and
Qwen2.5 ship, and transformers-5 `rope_parameters`) arrive normalised in one dict; we keep that
dict so rope.py can hand it back to transformers' own RoPE init functions and match HF exactly.
`--hf-overrides` (overrides.py) are merged into config.json's dict before transformers reads it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .overrides import apply_hf_overrides

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# model_type -> architecture, for configs that carry no `architectures` list
_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections (Qwen2 always; Llama when attention_bias)
    o_bias: bool  # bias on the output projection (Llama attention_bias only; Qwen2 has none)
    max_position_embeddings: int
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None  # None, or a window no shorter than max_position_embeddings
    softmax_scale: float
    rope_type: str  # one of SUPPORTED_ROPE_TYPES
    rope_theta: float
    # transformers' normalised rope_parameters dict as sorted (key, value) pairs, so the spec
    # stays hashable and picklable for broadcasting to ranks.
    rope_parameters: tuple[tuple[str, Any], ...]

    @property
    def rope_parameters_dict(self) -> dict[str, Any]:
        return dict(self.rope_parameters)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_model_len(self) -> int:
        """Longest sequence the checkpoint is meant for, derived as vLLM does: linear and
        dynamic RoPE stretch max_position_embeddings by `factor`, yarn stretches
        original_max_position_embeddings; llama3 configs already state the stretched length.
        (Dynamic NTK only changes anything past max_position_embeddings, so capping prompts
        at max_position_embeddings would make it dead code.)"""
        params = self.rope_parameters_dict
        if self.rope_type in ("linear", "dynamic"):
            return int(self.max_position_embeddings * params["factor"])
        if self.rope_type == "yarn":
            base = params.get("original_max_position_embeddings", self.max_position_embeddings)
            return max(self.max_position_embeddings, int(base * params["factor"]))
        return self.max_position_embeddings

    @property
    def trained_len(self) -> int:
        """The context the model was trained for before any RoPE stretching."""
        return int(self.rope_parameters_dict.get("original_max_position_embeddings",
                                                 self.max_position_embeddings))

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once); for bandwidth/FLOP reports."""
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attn + mlp + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + self.hidden_size


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON {what}: {e}; re-download or re-save "
                         "the checkpoint") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _architecture(raw: dict, path: Path) -> str:
    archs = raw.get("architectures") or []
    if archs:
        arch = archs[0]
    else:
        arch = _ARCH_BY_MODEL_TYPE.get(raw.get("model_type", ""), raw.get("model_type", "?"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path / 'config.json'}: architecture {arch!r} is not supported; "
                         f"sp-serve runs {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _dtype(config: Any, path: Path) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ValueError(f"{path / 'config.json'}: dtype {dtype!r} is not supported; use one of "
                         f"{', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _sliding_window(config: Any, arch: str, path: Path) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    # Qwen2 slides only on layers marked so (from max_window_layers on); Mistral on all layers.
    layer_types = getattr(config, "layer_types", None)
    if arch == "Qwen2ForCausalLM" and layer_types and "sliding_attention" not in layer_types:
        return None
    if window < config.max_position_embeddings:
        raise ValueError(
            f"{path / 'config.json'}: sliding-window attention (sliding_window={window} < "
            f"max_position_embeddings={config.max_position_embeddings}) is not supported; "
            "sp-serve attends to the full causal context. Use a checkpoint with sliding_window "
            "null (e.g. Mistral v0.2+) or use_sliding_window false (Qwen2)")
    return int(window)


def _rope(config: Any, path: Path) -> tuple[str, float, tuple[tuple[str, Any], ...]]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.pop("type", None)  # old spelling of rope_type; transformers copied it already
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{path / 'config.json'}: RoPE type {rope_type!r} is not supported; "
                         f"use one of {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{path / 'config.json'}: partial_rotary_factor "
                         f"{params['partial_rotary_factor']} is not supported; only full rotary "
                         "embedding (1.0) is")
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    params["rope_theta"] = theta
    params["rope_type"] = rope_type
    return rope_type, theta, tuple(sorted(params.items()))


def check_weight_files(path: Path) -> None:
    """The directory must hold safetensors weights: a single file or an index of shards."""
    if any((path / name).is_file() for name in WEIGHT_FILES):
        return
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = (f"; found {', '.join(others)}: convert it to safetensors (load with transformers "
            "and save_pretrained(dir, safe_serialization=True))" if others else "")
    raise ValueError(f"{path}: no weights found; expected {' or '.join(WEIGHT_FILES)}{hint}")


def _raw_config(path: Path, hf_overrides: dict[str, Any] | None) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file} not found; point the model path at a Hugging Face "
                         "checkpoint directory (with config.json and *.safetensors) or a .gguf file")
    return apply_hf_overrides(_read_json(config_file, "model config"), hf_overrides)


def load_hf_config(path: str | Path, hf_overrides: dict[str, Any] | None = None):
    """transformers' config of the checkpoint, with --hf-overrides merged in. The HF reference
    (tests, benchmarks) loads its model with this config, so both sides run the same one."""
    import transformers  # deferred: importing transformers costs about a second

    path = Path(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        if hf_overrides:
            config = type(config).from_dict(_raw_config(path, hf_overrides))
    except (ValueError, KeyError, TypeError, OSError) as e:
        what = "this config" + (" with these --hf-overrides" if hf_overrides else "")
        raise ValueError(f"{path / 'config.json'}: transformers cannot parse {what}: {e}") from e
    return config


def load_spec(path: str | Path, hf_overrides: dict[str, Any] | None = None) -> ModelSpec:
    """Reads config.json (and generation_config.json if present) of a HF checkpoint dir."""
    path = Path(path)
    config_file = path / "config.json"
    raw = _raw_config(path, hf_overrides)
    arch = _architecture(raw, path)
    check_weight_files(path)
    config = load_hf_config(path, hf_overrides)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"{config_file}: hidden_act {config.hidden_act!r} is not supported; "
                         "only 'silu' (SwiGLU MLP) is")
    if getattr(config, "mlp_bias", False):
        raise ValueError(f"{config_file}: mlp_bias true is not supported; only bias-free MLPs are")

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if config.num_attention_heads % num_kv_heads:
        raise ValueError(f"{config_file}: num_attention_heads ({config.num_attention_heads}) "
                         f"must be a multiple of num_key_value_heads ({num_kv_heads})")
    attention_bias = bool(getattr(config, "attention_bias", False))
    qkv_bias = True if arch == "Qwen2ForCausalLM" else attention_bias
    o_bias = False if arch == "Qwen2ForCausalLM" else attention_bias
    rope_type, rope_theta, rope_parameters = _rope(config, path)

    bos = getattr(config, "bos_token_id", None)
    eos = list(_token_ids(getattr(config, "eos_token_id", None)))
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        gen = _read_json(gen_file, "generation config")
        # generate() stops on generation_config's eos list (Llama-3 instruct adds <|eot_id|>
        # there), so we stop on the union of both.
        eos += [t for t in _token_ids(gen.get("eos_token_id")) if t not in eos]
        if bos is None:
            bos = gen.get("bos_token_id")

    return ModelSpec(
        architecture=arch,
        vocab_size=int(config.vocab_size),
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads),
        num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim),
        intermediate_size=int(config.intermediate_size),
        rms_norm_eps=float(config.rms_norm_eps),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        max_position_embeddings=int(config.max_position_embeddings),
        dtype=_dtype(config, path),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
        sliding_window=_sliding_window(config, arch, path),
        softmax_scale=float(head_dim) ** -0.5,
        rope_type=rope_type,
        rope_theta=rope_theta,
        rope_parameters=rope_parameters,
    )
