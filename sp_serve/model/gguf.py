"""GGUF files (llama.cpp's single-file format) served as Hugging Face checkpoints.

A GGUF file is converted once into a checkpoint directory under `$SP_SERVE_CACHE/gguf/` and
then loaded like any other. transformers does the reading: it dequantizes the tensors, undoes
llama.cpp's q/k row permutation, and builds the tokenizer and chat template from the file's
metadata, so the converted checkpoint is exactly what `from_pretrained(..., gguf_file=...)`
gives (the outside reference the tests compare with). The cache entry is stamped with the
file's path, size and mtime, so a changed file is converted again.

The checkpoint holds exactly the file's weights: in float32 (dequantized values, scale x
integer + min, are exact in float32 but not in bfloat16), except that when every matrix in the
file is float16 or bfloat16 the matrices are saved in that type (and config.json says so),
while norms and biases, float32 in GGUF files, stay float32. `--dtype` chooses what to run in.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import cache_root, cached_dir

log = logging.getLogger("sp_serve")

GGUF_VERSION = 1  # bump when the conversion changes; cached conversions are redone
# GGUF `general.architecture` -> the HF architecture it holds (llama.cpp writes Mistral models
# as "llama"; transformers reads them as Llama, the same network when there is no window)
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                      "qwen2": "Qwen2ForCausalLM"}
_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str  # general.architecture
    dtype: torch.dtype  # the matrices' type in the converted checkpoint (module docstring)
    has_tokenizer: bool
    rope_scaling: dict | None  # RoPE scaling the file states, which transformers ignores


def is_gguf(model: str | Path) -> bool:
    return str(model).lower().endswith(".gguf")


def _field(reader, key: str):
    """A scalar or string metadata value, or None (gguf >= 0.10 has no contents() yet)."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0]


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Checks that path is a readable GGUF file of an architecture sp-serve runs."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found; give the path of a .gguf file or of a Hugging Face "
                         "checkpoint directory")
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic "
                             "bytes); it may be corrupt or another format: download it again")
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises whatever numpy or struct does on a short file
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may "
                         "be truncated or corrupt: download it again") from e
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; sp-serve runs "
                         f"{', '.join(GGUF_ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2 families)")
    matrix_types = {t.tensor_type for t in reader.tensors if len(t.shape) == 2}
    narrow = {GGMLQuantizationType.F16: torch.float16, GGMLQuantizationType.BF16: torch.bfloat16}
    dtype = narrow[next(iter(matrix_types))] if len(matrix_types) == 1 and \
        next(iter(matrix_types)) in narrow else torch.float32
    return GGUFInfo(arch, dtype, _field(reader, "tokenizer.ggml.model") is not None,
                    _rope_scaling(reader, arch))


def _rope_scaling(reader, arch: str) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        scaling = {"rope_type": kind, "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        return {"rope_type": "llama3"}  # Llama 3.1: llama.cpp keeps only the scaled frequencies
    return None


def convert_gguf(path: str | Path, out_dir: str | Path, info: GGUFInfo | None = None) -> Path:
    """Writes the checkpoint transformers reads from the GGUF file into out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out_dir = Path(path).resolve(), Path(out_dir)
    info = info or read_gguf_info(path)
    log.info("converting %s (%s) into a Hugging Face checkpoint (once)", path, info.architecture)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                     if info.has_tokenizer else None)
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as e:
        raise ValueError(f"{path}: transformers cannot read this GGUF file: {e}") from e
    # The loaded model remembers its GGUF origin and refuses to be saved; it is plain dense
    # weights now, so drop that before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if info.dtype != torch.float32:
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 2:  # exact: the file stored them in this type
                    param.data = param.data.to(info.dtype)
        model.config.dtype = info.dtype
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    else:
        log.warning("%s carries no tokenizer; pass --tokenizer, or send prompt token ids", path)
    return out_dir


def gguf_checkpoint(path: str | Path) -> Path:
    """The converted checkpoint directory for a GGUF file, converting it on first use."""
    path = Path(path).expanduser().resolve()
    info = read_gguf_info(path)
    if info.rope_scaling is not None:
        log.warning("%s states RoPE scaling %s, which transformers' GGUF reader (and so this "
                    "conversion) leaves out: the model runs with plain RoPE up to its context "
                    "length. To apply it, pass --hf-overrides '{\"rope_scaling\": {...}}' with the "
                    "original checkpoint's rope_scaling", path, json.dumps(info.rope_scaling))
    stat = path.stat()
    want = {"version": GGUF_VERSION, "file": str(path), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{path.stem}-{key}"
    return cached_dir(target, "sp-serve-gguf.json", want,
                      lambda out: convert_gguf(path, out, info), "GGUF conversion")
