"""Loads a Hugging Face safetensors checkpoint (single file or sharded) into a CausalLM.

HF keeps q/k/v and gate/up as separate tensors; our layers hold them fused (one matmul each),
so each HF tensor is copied into its row range of the fused parameter. With tensor parallelism
each rank reads only its slice of each tensor (llama.py's TensorParallel says which). Every expected tensor is
checked for presence and shape, so a bad checkpoint fails with a message that names the file
and what is wrong. Extra tensors (e.g. old conversions' rotary_emb.inv_freq) are ignored.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from .gguf import is_gguf, read_gguf_info
from .llama import CausalLM, TensorParallel
from .spec import ModelSpec, load_spec


class _Piece(NamedTuple):
    """One HF tensor (or this rank's slice of it) and where it goes."""

    name: str
    param: torch.nn.Parameter
    row: int  # first destination row of `param`
    shape: tuple[int, ...]  # the HF tensor's whole shape, as config.json implies
    dim: int  # the dimension this rank takes a slice of (0: rows, 1: columns)
    start: int
    length: int


def _hf_layout(model: CausalLM) -> Iterator[_Piece]:
    """Every HF tensor the model needs, with this rank's slice of it (all of it without TP):
    q/k/v, gate/up and the vocabulary by rows, o and down by columns; norms whole."""
    spec, tp = model.spec, model.tp
    d, e, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    first_q, hq, first_kv, hkv = tp.heads(spec)
    i_local = i // tp.size

    def whole(name: str, param: torch.nn.Parameter) -> _Piece:
        return _Piece(name, param, 0, tuple(param.shape), 0, 0, param.shape[0])

    def rows(name, param, row, shape, start, length) -> _Piece:
        return _Piece(name, param, row, shape, 0, start, length)

    def cols(name, param, shape, start, length) -> _Piece:
        return _Piece(name, param, 0, shape, 1, start, length)

    vocab_first, vocab_rows = model.vocab_start, model.embed_weight.shape[0]
    yield rows("model.embed_tokens.weight", model.embed_weight, 0, (spec.vocab_size, d),
               vocab_first, vocab_rows)
    for idx, layer in enumerate(model.layers):
        pre = f"model.layers.{idx}.self_attn."
        yield whole(f"model.layers.{idx}.input_layernorm.weight", layer.input_norm.weight)
        # (projection, destination row, whole rows, first source row, rows)
        qkv = (("q_proj", 0, spec.q_size, first_q * e, hq * e),
               ("k_proj", hq * e, spec.kv_size, first_kv * e, hkv * e),
               ("v_proj", (hq + hkv) * e, spec.kv_size, first_kv * e, hkv * e))
        for proj, row, total, start, length in qkv:
            yield rows(f"{pre}{proj}.weight", layer.qkv_weight, row, (total, d), start, length)
            if layer.qkv_bias is not None:
                yield rows(f"{pre}{proj}.bias", layer.qkv_bias, row, (total,), start, length)
        yield cols(pre + "o_proj.weight", layer.o_weight, (d, spec.q_size), first_q * e, hq * e)
        if layer.o_bias is not None:
            yield whole(pre + "o_proj.bias", layer.o_bias)
        pre = f"model.layers.{idx}."
        yield whole(pre + "post_attention_layernorm.weight", layer.post_attention_norm.weight)
        yield rows(pre + "mlp.gate_proj.weight", layer.gate_up_weight, 0, (i, d),
                   tp.rank * i_local, i_local)
        yield rows(pre + "mlp.up_proj.weight", layer.gate_up_weight, i_local, (i, d),
                   tp.rank * i_local, i_local)
        yield cols(pre + "mlp.down_proj.weight", layer.down_weight, (d, i), tp.rank * i_local,
                   i_local)
    yield whole("model.norm.weight", model.norm.weight)
    if not spec.tie_word_embeddings:
        yield rows("lm_head.weight", model.lm_head_weight, 0, (spec.vocab_size, d), vocab_first,
                   vocab_rows)


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
               device: torch.device | str = "cpu", hf_overrides: dict | None = None,
               tp: TensorParallel | None = None) -> tuple[CausalLM, ModelSpec]:
    """Reads spec and weights; weights are cast to `dtype` (default: the checkpoint's). With
    tensor parallelism (tp) only this rank's slices are read from the files
    (safetensors' get_slice): no rank materialises the whole model."""
    path = Path(path)
    spec = load_spec(path, hf_overrides)
    if dtype is not None:
        spec = replace(spec, dtype=dtype)
    files = _weight_map(path)
    model = CausalLM(spec, device=device, dtype=spec.dtype, tp=tp)
    layout = list(_hf_layout(model))

    missing = [piece.name for piece in layout if piece.name not in files]
    if missing:
        shown = ", ".join(missing[:5])
        if len(missing) > 5:
            shown += f" and {len(missing) - 5} more"
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s) a "
                         f"{spec.architecture} with this config.json needs: {shown}")

    by_file: dict[Path, list[_Piece]] = {}
    for piece in layout:
        by_file.setdefault(files[piece.name], []).append(piece)
    with torch.no_grad():
        for file, pieces in sorted(by_file.items()):
            with _open(file) as handle:
                for piece in pieces:
                    name, param, row = piece.name, piece.param, piece.row
                    try:
                        sliced = handle.get_slice(name)
                        shape = tuple(sliced.get_shape())
                        if shape != piece.shape:
                            raise ValueError(
                                f"{file}: tensor {name} has shape {shape} but config.json implies "
                                f"{piece.shape}; config.json and weights do not belong together")
                        lo, hi = piece.start, piece.start + piece.length
                        tensor = sliced[lo:hi] if piece.dim == 0 else sliced[:, lo:hi]
                    except (SafetensorError, OSError) as e:
                        raise ValueError(f"{file}: cannot read tensor {name} ({e}); the file "
                                         "may be corrupt: re-download it") from e
                    param[row:row + tensor.shape[0]].copy_(tensor)
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
