"""Where the Triton kernels can run. Imports Triton only inside triton_available(), so it is safe without it."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    """Triton is importable and has somewhere to run: a CUDA device or the CPU interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreting()


def next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()
