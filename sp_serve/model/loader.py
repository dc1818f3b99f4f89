"""Loads a Hugging Face safetensors checkpoint (single file or sharded) into a CausalLM.

HF keeps q/k/v and gate/up as separate tensors; our layers hold them fused (one matmul each),
so each HF tensor is copied into its row range of the fused parameter. Every expected tensor is
checked for presence and shape, so a bad checkpoint fails with a message that names the file
and what is wrong. Extra tensors (e.g. old conversions' rotary_emb.inv_freq) are ignored.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .gguf import is_gguf, read_gguf_info
from .llama import CausalLM
from .spec import ModelSpec, load_spec


def _hf_layout(model: CausalLM) -> Iterator[tuple[str, torch.nn.Parameter, int, int]]:
    """(HF tensor name, our parameter, first row, rows) for every tensor the model needs."""
    spec = model.spec

    def whole(name: str, param: torch.nn.Parameter):
        return name, param, 0, param.shape[0]

    yield whole("model.embed_tokens.weight", model.embed_weight)
    for idx, layer in enumerate(model.layers):
        pre = f"model.layers.{idx}.self_attn."
        yield whole(f"model.layers.{idx}.input_layernorm.weight", layer.input_norm.weight)
        qkv_rows = (("q_proj", 0, spec.q_size), ("k_proj", spec.q_size, spec.kv_size),
                    ("v_proj", spec.q_size + spec.kv_size, spec.kv_size))
        for proj, row, rows in qkv_rows:
            yield f"{pre}{proj}.weight", layer.qkv_weight, row, rows
            if layer.qkv_bias is not None:
                yield f"{pre}{proj}.bias", layer.qkv_bias, row, rows
        yield whole(pre + "o_proj.weight", layer.o_weight)
        if layer.o_bias is not None:
            yield whole(pre + "o_proj.bias", layer.o_bias)
        pre = f"model.layers.{idx}."
        yield whole(pre + "post_attention_layernorm.weight", layer.post_attention_norm.weight)
        i = spec.intermediate_size
        yield pre + "mlp.gate_proj.weight", layer.gate_up_weight, 0, i
        yield pre + "mlp.up_proj.weight", layer.gate_up_weight, i, i
        yield whole(pre + "mlp.down_proj.weight", layer.down_weight)
    yield whole("model.norm.weight", model.norm.weight)
    if not spec.tie_word_embeddings:
        yield whole("lm_head.weight", model.lm_head_weight)


def _weight_map(path: Path) -> dict[str, Path]:
    """HF tensor name -> file holding it."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_file} is not a valid safetensors index (a JSON object "
                             f"with a 'weight_map'): {e}; re-download or re-save it") from e
        files = {name: path / fname for name, fname in weight_map.items()}
        for fname in sorted(set(files.values())):
            if not fname.is_file():
                raise ValueError(f"{fname} is named in {index_file.name} but missing; "
                                 "download every shard of the checkpoint")
        return files
    single = path / "model.safetensors"
    with _open(single) as handle:
        return dict.fromkeys(handle.keys(), single)


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a valid safetensors file ({e}); it may be truncated or "
                         "corrupt: re-download or re-save the checkpoint") from e


def load_model(path: str | Path, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", hf_overrides: dict | None = None
               ) -> tuple[CausalLM, ModelSpec]:
    """Reads spec and weights; weights are cast to `dtype` (default: the checkpoint's)."""
    path = Path(path)
    spec = load_spec(path, hf_overrides)
    if dtype is not None:
        spec = replace(spec, dtype=dtype)
    files = _weight_map(path)
    model = CausalLM(spec, device=device, dtype=spec.dtype)
    layout = list(_hf_layout(model))

    missing = [entry[0] for entry in layout if entry[0] not in files]
    if missing:
        shown = ", ".join(missing[:5])
        if len(missing) > 5:
            shown += f" and {len(missing) - 5} more"
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s) a "
                         f"{spec.architecture} with this config.json needs: {shown}")

    by_file: dict[Path, list[tuple[str, torch.nn.Parameter, int, int]]] = {}
    for entry in layout:
        by_file.setdefault(files[entry[0]], []).append(entry)
    with torch.no_grad():
        for file, entries in sorted(by_file.items()):
            with _open(file) as handle:
                for name, param, row, rows in entries:
                    try:
                        tensor = handle.get_tensor(name)
                    except (SafetensorError, OSError) as e:
                        raise ValueError(f"{file}: cannot read tensor {name} ({e}); the file "
                                         "may be corrupt: re-download it") from e
                    expected = (rows, *param.shape[1:])
                    if tuple(tensor.shape) != expected:
                        raise ValueError(f"{file}: tensor {name} has shape {tuple(tensor.shape)} "
                                         f"but config.json implies {expected}; config.json and "
                                         "weights do not belong together")
                    param[row:row + rows].copy_(tensor)
    return model.eval(), spec


def load_tokenizer(path: str | Path, required: bool = False):
    """transformers AutoTokenizer for a checkpoint directory or a GGUF file, or None when it
    ships no tokenizer (an error when required: --tokenizer names it)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if is_gguf(path):
        info = read_gguf_info(path)
        if info.has_tokenizer:
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    elif any((path / name).is_file() for name in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(path)
    if required:
        raise ValueError(f"--tokenizer {path}: no tokenizer there; give a directory with "
                         f"{' or '.join(_TOKENIZER_FILES)}, or a .gguf file that carries one")
    return None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
