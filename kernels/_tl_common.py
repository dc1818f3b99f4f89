"""Triton helpers shared by the kernels in this package."""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from ._env import interpreting


def no_specialize(*args: str, alignment: tuple[str, ...] = ()) -> dict[str, object]:
    """triton.jit options for arguments that change from step to step while serving (lengths,
    batch-dependent strides, split counts; pointers into a step's metadata). Triton compiles a
    variant per value class (== 1, divisible by 16, other; pointers 16-byte aligned or not),
    so such an argument would compile a new kernel in the middle of serving, on one rank while
    the others wait in a collective. Not specializing costs nothing measurable for these
    (scalar loads and address arithmetic). `alignment`: pointers whose alignment may vary
    (Triton >= 3.2 spells the option; older versions simply specialize them)."""
    options: dict[str, object] = {"do_not_specialize": list(args)}
    if alignment and "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
        options["do_not_specialize_on_alignment"] = list(alignment)
    return options


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    UPCAST works around the Triton CPU interpreter, which multiplies the raw uint16 bits of
    bf16 operands (seen with triton 3.9). bf16 -> fp32 is exact and bf16 products are exact in
    fp32, so the upcast dot gives the value the GPU's tensor cores give. Never set on a GPU.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


def dot_flags(dtype: torch.dtype) -> dict[str, object]:
    """Constexpr flags for `mma` given the operands' dtype.

    fp32 inputs use IEEE fp32 products rather than TF32 (10-bit mantissa), so fp32 stays a
    precise path that tests can hold to 1e-4.
    """
    return {
        "UPCAST": dtype == torch.bfloat16 and interpreting(),
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


@triton.jit
def load_tile(ptrs, rows_ok, dims_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, zero outside the valid rows and head_dim columns.

    Masks are built only where needed (decided at compile time): an all-true mask the compiler
    cannot see through could cost the wide vector loads.
    """
    if CHECK_ROWS:
        mask = rows_ok[:, None]
        if BLOCK_D != HEAD_DIM:
            mask = mask & (dims_d < HEAD_DIM)[None, :]
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        tile = tl.load(ptrs, mask=(dims_d < HEAD_DIM)[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile
