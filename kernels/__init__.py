"""Triton kernels for sp-serve, installed as `sp_serve_kernels` (`kernels` is a PyPI name).

    prefill_attention          varlen FlashAttention forward returning (out, lse)
    paged_decode_attention     split-KV decode over a paged KV cache returning (out, lse)
    merge_attention_partials   log-sum-exp merge of (out, lse) partials
    rope_and_cache_kv          RoPE on k fused with the paged KV-cache write
    triton_available()         whether the kernels can run here (backends pick with it)

Each kernel has a plain-torch float64 reference in `reference.py`. Importing this package never
needs Triton; without it the kernel names raise a RuntimeError when called.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _hand_over_to_pypi_kernels() -> bool:
    """Whether this folder was imported as `kernels` and PyPI's package of that name took its
    place. The checkout's root on sys.path (`python -m`/`-c` or pytest run from it) makes this
    folder shadow PyPI's `kernels`, which transformers imports (>= 5.25 depends on it): hand
    that import the real package, found on sys.path without the checkout."""
    if __name__ != "kernels":
        return False
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
    spec.loader.exec_module(module)
    return True


if not _hand_over_to_pypi_kernels():
    from ._env import triton_available
    from .reference import (
        merge_attention_partials_ref,
        paged_decode_attention_ref,
        prefill_attention_ref,
        rope_and_cache_kv_ref,
    )

    try:
        import triton  # noqa: F401
    except ImportError as _error:  # the torch references and triton_available() still work
        _missing = _error

        def _needs_triton(*args: object, **kwargs: object) -> None:
            raise RuntimeError(
                f"sp_serve_kernels needs Triton ({_missing}); install it with `pip install triton` "
                "or use a torch attention backend (check triton_available() first)"
            )

        prefill_attention = paged_decode_attention = _needs_triton
        merge_attention_partials = rope_and_cache_kv = _needs_triton
    else:
        from .decode_attention import paged_decode_attention
        from .lse_merge import merge_attention_partials
        from .prefill_attention import prefill_attention
        from .rope_cache import rope_and_cache_kv

__all__ = [
    "merge_attention_partials",
    "merge_attention_partials_ref",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "prefill_attention",
    "prefill_attention_ref",
    "rope_and_cache_kv",
    "rope_and_cache_kv_ref",
    "triton_available",
]
