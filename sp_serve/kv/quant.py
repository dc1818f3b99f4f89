"""Quantized KV cache: formats, and quantize / dequantize with one scale per token and KV head.

`--kv-cache-dtype` (vLLM's spellings, plus int8): auto stores K/V in the model's dtype; fp8 (=
fp8_e4m3), fp8_e5m2 and int8 store one byte per element and a bfloat16 scale per (token, KV
head): x ≈ q * scale, scale = absmax over the head's d values / the format's largest value.

Why per token and head: a token's K/V are quantized when they are written, from that token
alone, so writes stay independent of one another (a decode token, a rank's zigzag share, a
shared prefix's copied block need nothing else), the scale lives in the token's slot, and no
block is ever re-quantized. A per-tensor or per-layer scale would have to be fixed ahead (vLLM
calibrates one, and once lost a 128K needle test to it); a per-channel key scale (KIVI) needs a
group of tokens before anything is stored. Per token and head, an outlier token or head costs
precision to itself alone. The price is 2 bytes per d elements (3% at d = 64), so a token costs
d + 2 bytes per head instead of 2d (bf16) or 4d (fp32): 1.94x and 3.88x the capacity at d = 64.

The scale is bfloat16 (float32's exponent range: no tiny or huge absmax under- or overflows it)
rounded up, so that absmax / scale never exceeds the format's largest value; values are then
divided by the stored scale itself, so dequantizing multiplies by exactly the divisor.

Legend: t tokens, h KV heads, d head_dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "int8")
SCALE_DTYPE = torch.bfloat16
_ABSMAX_FLOOR = 1e-30  # an all-zero head gets a tiny scale, not 0 (no 0 / 0)


@dataclass(frozen=True)
class KVFormat:
    name: str  # canonical: fp8_e4m3, fp8_e5m2, int8
    storage: torch.dtype  # element type of the pool
    qmax: float  # largest representable magnitude


_FORMATS = {
    "fp8_e4m3": KVFormat("fp8_e4m3", torch.float8_e4m3fn, 448.0),
    "fp8_e5m2": KVFormat("fp8_e5m2", torch.float8_e5m2, 57344.0),
    "int8": KVFormat("int8", torch.int8, 127.0),
}


def kv_format(kv_cache_dtype: str) -> KVFormat | None:
    """The storage format for a --kv-cache-dtype value; None for auto (the model's dtype)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                         f"got {kv_cache_dtype!r}")
    if kv_cache_dtype == "auto":
        return None
    return _FORMATS["fp8_e4m3" if kv_cache_dtype == "fp8" else kv_cache_dtype]


def element_bytes(fmt: KVFormat | None, model_dtype: torch.dtype) -> float:
    """Bytes per stored element of one token's KV head (the scale spread over head_dim is
    added by `kv_bytes_per_token`)."""
    return (torch.finfo(model_dtype).bits if fmt is None else 8) / 8


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                       model_dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes one token's K and V take in one rank's pool, scales included."""
    fmt = kv_format(kv_cache_dtype)
    per_head = head_dim * torch.finfo(model_dtype).bits // 8
    if fmt is not None:
        per_head = head_dim + SCALE_DTYPE.itemsize
    return num_layers * 2 * num_kv_heads * per_head


def quantize(x_thd: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [t, h, d] in fmt.storage, scale [t, h] bfloat16) with x ≈ q * scale."""
    x = x_thd.float()
    absmax = x.abs().amax(dim=-1).clamp_min(_ABSMAX_FLOOR)
    # Round the scale up (one bf16 step of margin, then nearest): absmax / scale <= qmax.
    scale_th = (absmax / fmt.qmax * (1 + 2**-7)).to(SCALE_DTYPE)
    y = (x / scale_th.float().unsqueeze(-1)).clamp(-fmt.qmax, fmt.qmax)
    if fmt.storage == torch.int8:
        y = y.round()
    return y.to(fmt.storage), scale_th


def dequantize(q_thd: torch.Tensor, scale_th: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale in `dtype` (products in float32)."""
    return (q_thd.float() * scale_th.float().unsqueeze(-1)).to(dtype)


_FLOAT_TABLES: dict[tuple[torch.dtype, torch.dtype, torch.device], torch.Tensor] = {}


def bytes_to_float_(out: torch.Tensor, raw: torch.Tensor, fmt: KVFormat,
                    index: torch.Tensor | None = None) -> torch.Tensor:
    """out (float32/float64, raw's shape) = the stored elements `raw` (their bytes, uint8) as
    numbers, exactly as q.to(out.dtype). On CPU, torch converts float8_e4m3fn one element at a
    time (~3 ns each, 50x int8's conversion): that format goes through a 256-entry table
    instead (`index`: an int32 scratch of raw's shape, else allocated)."""
    if fmt.storage != torch.float8_e4m3fn or raw.device.type != "cpu":
        return out.copy_(raw.view(fmt.storage))
    key = (fmt.storage, out.dtype, raw.device)
    table = _FLOAT_TABLES.get(key)
    if table is None:
        table = _FLOAT_TABLES[key] = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(
            fmt.storage).to(out.dtype)
    index = torch.empty(raw.shape, dtype=torch.int32) if index is None else index
    index.copy_(raw)
    return torch.index_select(table, 0, index.view(-1), out=out.view(-1)).view(out.shape)


def max_abs_error(fmt: KVFormat, absmax_th: torch.Tensor) -> torch.Tensor:
    """A bound on |x - dequantize(quantize(x))| per (token, head), from the head's absmax: half
    a step of int8 (scale / 2), or half a unit in the last place of the fp8 format at absmax
    (2^-4 relative for e4m3's 3 mantissa bits, 2^-3 for e5m2's 2), plus the scale's rounding."""
    scale = absmax_th.float() / fmt.qmax * (1 + 2**-6)
    if fmt.storage == torch.int8:
        return scale * 0.5 * (1 + 1e-3)
    rel = 2.0**-4 if fmt.name == "fp8_e4m3" else 2.0**-3
    return absmax_th.float() * rel * (1 + 2**-6) + scale * 2**-9  # + the subnormal step
