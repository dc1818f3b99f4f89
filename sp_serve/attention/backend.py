"""Which kernels compute the local attention partials.

auto: on CUDA, flash-attn when installed, else the Triton kernels (sp_serve_kernels), else torch's
flash SDPA op; on CPU, torch (its CPU flash kernel returns the lse). --attn-backend forces one.
"""
from __future__ import annotations

import importlib.util

import torch


def resolve_backend(requested: str, device: torch.device) -> str:
    if device.type != "cuda":
        if requested not in ("auto", "torch"):
            raise ValueError(f"--attn-backend {requested} needs a CUDA device; on CPU use torch (or auto)")
        return "torch"
    have_flash = importlib.util.find_spec("flash_attn") is not None
    from sp_serve_kernels import triton_available
    if requested == "auto":
        return "flash-attn" if have_flash else ("triton" if triton_available() else "torch")
    if requested == "flash-attn" and not have_flash:
        raise ValueError("--attn-backend flash-attn: the flash_attn package is not installed "
                         "(pip install 'sp-serve[flash-attn]') ")
    if requested == "triton" and not triton_available():
        raise ValueError("--attn-backend triton: Triton is not importable here")
    return requested


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads/rank)"
