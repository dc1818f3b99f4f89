"""Triton kernels (sp_serve_kernels) against their float64 torch references.

Runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before Triton is
imported); on a GPU machine run with TRITON_INTERPRET=0 to test the compiled kernels on CUDA.
The interpreter is slow, so cases are tiny: head_dim 16/32 mostly, one case each at 64 and 128.
Every case draws fresh inputs from its own seed, poisons the outputs with NaN first (an element
the kernel forgets to write fails), and checks that no NaN comes out.

Shape legend: t tokens, h heads, d head_dim, b batch, p partials.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
import zlib

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

import sp_serve_kernels as K
from sp_serve_kernels.prefill_attention import PrefillConfig

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
TOL = {  # (rtol, atol) for outputs; lse is fp32 math on exact products in every case
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def rng(case: str) -> torch.Generator:
    """A generator seeded by the case's name: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(case.encode()))


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


def nan_like(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)


def assert_matches(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor,
                   ref_lse: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "NaN (or an unwritten element) in out"
    assert not lse.isnan().any(), "NaN (or an unwritten element) in lse"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), rtol=rtol, atol=atol)
    # -inf must sit exactly where the reference has it (assert_close compares infinities).
    torch.testing.assert_close(lse.double().cpu(), ref_lse.cpu(), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- prefill attention

PREFILL_CASES = [
    # (q lengths, k lengths, Hq, Hkv, D, dtype, causal, config (block_m, block_n))
    # Lq == Lk: self attention; empty sequences in the middle; odd lengths.
    ([7, 0, 33, 1], [7, 0, 33, 1], 2, 2, 16, torch.float32, True, (32, 16)),
    ([7, 0, 33, 1], [7, 0, 33, 1], 4, 2, 16, torch.float32, False, (16, 32)),
    # Lq < Lk (zigzag half block, chunked prefill), Lq > Lk (leading rows see nothing),
    # zero keys for some queries.
    ([5, 17, 9, 3], [21, 4, 9, 0], 4, 1, 16, torch.float32, True, (16, 16)),
    ([5, 17, 9, 3], [21, 4, 9, 0], 8, 2, 32, torch.float32, False, (32, 16)),
    ([16, 16], [32, 48], 4, 4, 32, torch.float32, True, (16, 32)),
    # head_dim that is not a power of two (masked columns), and one below tl.dot's 16.
    ([9, 20], [9, 20], 2, 1, 24, torch.float32, True, (16, 16)),
    ([9, 20], [13, 20], 2, 2, 8, torch.float32, True, (16, 16)),
    # half precision
    ([7, 33, 2], [7, 33, 2], 4, 2, 32, torch.bfloat16, True, (32, 16)),
    ([12, 1], [40, 5], 4, 1, 16, torch.bfloat16, False, (16, 32)),
    ([19], [19], 2, 1, 16, torch.float16, True, (16, 16)),
    # the production head sizes, few tokens
    ([18, 5], [18, 9], 2, 1, 64, torch.bfloat16, True, None),
    ([11], [11], 2, 2, 128, torch.float32, True, None),
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"{c[0]}x{c[1]}-h{c[2]}/{c[3]}"
                         f"-d{c[4]}-{str(c[5])[6:]}-{'causal' if c[6] else 'full'}-{c[7]}")
def test_prefill_attention(case) -> None:
    q_lens, k_lens, hq, hkv, d, dtype, causal, blocks = case
    gen = rng(str(case))
    q_thd = randn(gen, sum(q_lens), hq, d, dtype=dtype)
    k_thd = randn(gen, sum(k_lens), hkv, d, dtype=dtype)
    v_thd = randn(gen, sum(k_lens), hkv, d, dtype=dtype)
    cu_q, cu_k = cu_seqlens(q_lens), cu_seqlens(k_lens)
    scale = d**-0.5
    out_thd = nan_like(q_thd.shape, dtype)
    lse_ht = nan_like((hq, sum(q_lens)), torch.float32)
    config = PrefillConfig(*blocks, num_warps=4, num_stages=1) if blocks else None
    K.prefill_attention(q_thd, k_thd, v_thd, cu_q, cu_k, max(q_lens), max(k_lens), causal,
                        scale, out=out_thd, lse_out=lse_ht, config=config)
    ref_out, ref_lse = K.prefill_attention_ref(q_thd, k_thd, v_thd, cu_q, cu_k, causal, scale)
    assert_matches(out_thd, lse_ht, ref_out, ref_lse, dtype)


def test_prefill_strided_inputs_and_default_outputs() -> None:
    """q/k/v as views of one fused qkv projection (token stride != H * D); outputs allocated."""
    gen = rng("strided")
    hq, hkv, d, lens = 4, 2, 16, [6, 13]
    qkv = randn(gen, sum(lens), hq + 2 * hkv, d, dtype=torch.float32)
    q_thd, k_thd, v_thd = qkv.split([hq, hkv, hkv], dim=1)
    cu = cu_seqlens(lens)
    out_thd, lse_ht = K.prefill_attention(q_thd, k_thd, v_thd, cu, cu, 13, 13, True, 0.3)
    assert out_thd.dtype == torch.float32 and lse_ht.shape == (hq, sum(lens))
    ref_out, ref_lse = K.prefill_attention_ref(q_thd, k_thd, v_thd, cu, cu, True, 0.3)
    assert_matches(out_thd, lse_ht, ref_out, ref_lse, torch.float32)


def test_ring_steps_merge_to_full_causal_attention() -> None:
    """How ring prefill uses the kernels: the q block of rank 2 (keys 16..24 of a 24-token
    causal sequence) meets kv blocks 0, 1 (full) and 2 (diagonal, causal); each step writes
    its partial straight into a slice of one fp32 buffer; one merge gives full attention."""
    gen = rng("ring")
    hq, hkv, d, block, dtype = 4, 2, 16, 8, torch.bfloat16
    q_thd = randn(gen, 3 * block, hq, d, dtype=dtype)
    k_thd = randn(gen, 3 * block, hkv, d, dtype=dtype)
    v_thd = randn(gen, 3 * block, hkv, d, dtype=dtype)
    cu = cu_seqlens([block])
    mine = slice(2 * block, 3 * block)
    o_pthd = nan_like((3, block, hq, d), torch.float32)
    lse_pht = nan_like((3, hq, block), torch.float32)
    for step in range(3):
        kv = slice(step * block, (step + 1) * block)
        K.prefill_attention(q_thd[mine], k_thd[kv], v_thd[kv], cu, cu, block, block,
                            causal=step == 2, softmax_scale=d**-0.5,
                            out=o_pthd[step], lse_out=lse_pht[step])
    out_thd = nan_like((block, hq, d), dtype)
    lse_ht = nan_like((hq, block), torch.float32)
    K.merge_attention_partials(o_pthd, lse_pht, out=out_thd, lse_out=lse_ht)
    cu_all = cu_seqlens([3 * block])
    ref_out, ref_lse = K.prefill_attention_ref(q_thd, k_thd, v_thd, cu_all, cu_all, True,
                                               d**-0.5)
    assert_matches(out_thd, lse_ht, ref_out[mine], ref_lse[:, mine], dtype)


# ---------------------------------------------------------------- paged decode attention

DECODE_CASES = [
    # (context lengths, Hq, Hkv, D, page size, dtype, num_splits)
    ([0, 1, 37, 70], 4, 4, 32, 16, torch.float32, 1),
    ([0, 1, 37, 70], 4, 2, 32, 16, torch.float32, 3),
    ([5, 64, 17], 8, 2, 16, 8, torch.float32, None),
    ([33, 0, 2], 4, 1, 16, 5, torch.float32, 8),  # page size not a power of two; empty splits
    ([129, 7], 16, 1, 16, 16, torch.float32, 2),  # MQA, 16 q heads in one tile
    ([23, 48, 1], 4, 2, 32, 16, torch.bfloat16, 2),
    ([40], 2, 1, 16, 8, torch.float16, None),
    ([50, 3], 4, 1, 64, 16, torch.bfloat16, 2),
    ([19], 2, 2, 128, 8, torch.float32, 2),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"ctx{c[0]}-h{c[1]}/{c[2]}-d{c[3]}"
                         f"-page{c[4]}-{str(c[5])[6:]}-splits{c[6]}")
def test_paged_decode_attention(case) -> None:
    ctx_lens, hq, hkv, d, page, dtype, num_splits = case
    gen = rng(str(case))
    batch = len(ctx_lens)
    max_pages = max(-(-n // page) for n in ctx_lens) + 2  # + padding columns
    num_pages = batch * max_pages + 3
    k_cache = randn(gen, num_pages, page, hkv, d, dtype=dtype)
    v_cache = randn(gen, num_pages, page, hkv, d, dtype=dtype)
    # Distinct random pages per sequence; columns past a sequence's pages hold junk (even out
    # of range), which the kernel must never read.
    perm = torch.randperm(num_pages, generator=gen)[: batch * max_pages]
    block_tables = perm.view(batch, max_pages).to(torch.int32)
    for b, n in enumerate(ctx_lens):
        block_tables[b, -(-n // page):] = 10**9
    block_tables = block_tables.to(DEVICE)
    context_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    q_bhd = randn(gen, batch, hq, d, dtype=dtype)
    out_bhd = nan_like(q_bhd.shape, dtype)
    lse_bh = nan_like((batch, hq), torch.float32)
    scale = d**-0.5
    K.paged_decode_attention(q_bhd, k_cache, v_cache, block_tables, context_lens, scale,
                             num_splits, out=out_bhd, lse_out=lse_bh)
    ref_out, ref_lse = K.paged_decode_attention_ref(q_bhd, k_cache, v_cache, block_tables,
                                                    context_lens, scale)
    assert_matches(out_bhd, lse_bh, ref_out, ref_lse, dtype)


QUANT_DECODE_CASES = [
    # (context lengths, Hq, Hkv, D, page size, q dtype, cache dtype, num_splits)
    ([0, 1, 37, 70], 4, 2, 32, 16, torch.float32, torch.int8, 3),
    ([23, 48], 4, 1, 16, 8, torch.bfloat16, torch.float8_e4m3fn, 2),
    ([40, 5], 2, 2, 64, 16, torch.float16, torch.float8_e5m2, None),
]


@pytest.mark.parametrize("case", QUANT_DECODE_CASES,
                         ids=lambda c: f"ctx{c[0]}-{str(c[5])[6:]}-{str(c[6])[6:]}")
def test_paged_decode_attention_on_quantized_pages(case) -> None:
    """One byte per element and a scale per (token, kv head), read in place: the kernel's
    result equals the reference on element * scale (the dequantized cache) in float64."""
    ctx_lens, hq, hkv, d, page, dtype, cache_dtype, num_splits = case
    gen = rng(str(case))
    batch = len(ctx_lens)
    max_pages = max(-(-n // page) for n in ctx_lens) + 1
    num_pages = batch * max_pages + 2
    raw = torch.randn(2, num_pages, page, hkv, d, generator=gen) * 20
    k_cache, v_cache = (x.clamp(-127, 127).round().to(cache_dtype).to(DEVICE) for x in raw)
    scales = (torch.rand(2, num_pages, page, hkv, generator=gen) * 0.1).to(torch.bfloat16)
    k_scale, v_scale = scales.to(DEVICE)
    block_tables = torch.randperm(num_pages, generator=gen)[: batch * max_pages]
    block_tables = block_tables.view(batch, max_pages).to(torch.int32).to(DEVICE)
    context_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    q_bhd = randn(gen, batch, hq, d, dtype=dtype)
    out_bhd = nan_like(q_bhd.shape, dtype)
    lse_bh = nan_like((batch, hq), torch.float32)
    K.paged_decode_attention(q_bhd, k_cache, v_cache, block_tables, context_lens, d**-0.5,
                             num_splits, out=out_bhd, lse_out=lse_bh, kv_scales=(k_scale, v_scale))
    ref_out, ref_lse = K.paged_decode_attention_ref(q_bhd, k_cache, v_cache, block_tables,
                                                    context_lens, d**-0.5,
                                                    kv_scales=(k_scale, v_scale))
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton's interpreter rounds float32 -> bfloat16 toward zero (a GPU rounds to nearest,
        # as the reference does), so the dequantized keys differ in their last bit here.
        assert not out_bhd.isnan().any() and not lse_bh.isnan().any()
        torch.testing.assert_close(out_bhd.double(), ref_out, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lse_bh.double(), ref_lse, rtol=1e-2, atol=2e-2)
    else:
        assert_matches(out_bhd, lse_bh, ref_out, ref_lse, dtype)
    with pytest.raises(ValueError, match="kv_scales needs an int8 or float8 cache"):
        K.paged_decode_attention(q_bhd, q_bhd[:, None], q_bhd[:, None], block_tables[:, :1],
                                 context_lens, 1.0, kv_scales=(k_scale, v_scale))


def test_decode_default_outputs_and_all_empty() -> None:
    gen = rng("decode-empty")
    k_cache = randn(gen, 4, 8, 1, 16, dtype=torch.float32)
    q_bhd = randn(gen, 2, 2, 16, dtype=torch.float32)
    tables = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    out_bhd, lse_bh = K.paged_decode_attention(q_bhd, k_cache, k_cache, tables, lens, 0.25)
    assert torch.equal(out_bhd, torch.zeros_like(q_bhd))
    assert torch.isneginf(lse_bh).all() and lse_bh.dtype == torch.float32


# ---------------------------------------------------------------- lse merge

MERGE_CASES = [
    # (P, T, H, D, dtype of partials)
    (1, 3, 2, 16, torch.float32),
    (3, 9, 5, 24, torch.float32),
    (4, 2, 32, 128, torch.float32),
    (2, 7, 4, 32, torch.bfloat16),
]


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: f"p{c[0]}-t{c[1]}-h{c[2]}-d{c[3]}"
                         f"-{str(c[4])[6:]}")
def test_merge_attention_partials(case) -> None:
    parts, tokens, heads, d, dtype = case
    gen = rng(str(case))
    o_pthd = randn(gen, parts, tokens, heads, d, dtype=dtype)
    lse_pht = (randn(gen, parts, heads, tokens, dtype=torch.float32) * 3).contiguous()
    # Empty partials (lse -inf) carrying garbage, and a (token, head) no partial saw.
    empty_pht = torch.rand(parts, heads, tokens, generator=gen).to(DEVICE) < 0.3
    empty_pht[:, 0, 0] = True
    lse_pht[empty_pht] = float("-inf")
    o_pthd[empty_pht.transpose(1, 2)] = float("nan")
    out_thd = nan_like((tokens, heads, d), dtype)
    lse_ht = nan_like((heads, tokens), torch.float32)
    K.merge_attention_partials(o_pthd, lse_pht, out=out_thd, lse_out=lse_ht)
    ref_out, ref_lse = K.merge_attention_partials_ref(o_pthd, lse_pht)
    assert_matches(out_thd, lse_ht, ref_out, ref_lse, dtype)
    assert torch.equal(out_thd[0, 0], torch.zeros_like(out_thd[0, 0]))


def test_merge_decode_layout_and_lists() -> None:
    """Cross-rank decode: gathered o [P, B, H, D] and lse [P, B, H] merge through a transposed
    view, into an lse [B, H] through lse_out=lse_bh.t(); lists are accepted too."""
    gen = rng("merge-decode")
    parts, batch, heads, d = 3, 4, 8, 32
    o_pbhd = randn(gen, parts, batch, heads, d, dtype=torch.float32)
    lse_pbh = randn(gen, parts, batch, heads, dtype=torch.float32)
    lse_pbh[1] = float("-inf")  # a rank whose shard holds nothing of these sequences
    out_bhd = nan_like((batch, heads, d), torch.bfloat16)
    lse_bh = nan_like((batch, heads), torch.float32)
    K.merge_attention_partials(o_pbhd, lse_pbh.transpose(1, 2), out=out_bhd, lse_out=lse_bh.t())
    ref_out, ref_lse = K.merge_attention_partials_ref(o_pbhd, lse_pbh.transpose(1, 2))
    assert_matches(out_bhd, lse_bh.t(), ref_out, ref_lse, torch.bfloat16)

    out_list, lse_list = K.merge_attention_partials(list(o_pbhd), list(lse_pbh.transpose(1, 2)))
    assert out_list.dtype == torch.float32 and lse_list.shape == (heads, batch)
    assert_matches(out_list, lse_list, ref_out, ref_lse, torch.float32)


# ---------------------------------------------------------------- RoPE + cache write

ROPE_CASES = [
    # (tokens, Hkv, D, page size, dtype, write k_out)
    (9, 2, 16, 4, torch.float32, True),
    (13, 3, 24, 8, torch.bfloat16, False),  # head count and half-dim not powers of two
    (6, 2, 32, 16, torch.bfloat16, True),
    (5, 1, 128, 16, torch.float16, False),
]


@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: f"t{c[0]}-h{c[1]}-d{c[2]}"
                         f"-page{c[3]}-{str(c[4])[6:]}-kout{c[5]}")
def test_rope_and_cache_kv(case) -> None:
    """Bitwise the same cache (and rotated k) as the eager torch path; skipped slots untouched."""
    tokens, hkv, d, page, dtype, with_k_out = case
    gen = rng(str(case))
    k_thd = randn(gen, tokens, hkv, d, dtype=dtype)
    v_thd = randn(gen, tokens, hkv, d, dtype=dtype)
    angles_tf = torch.rand(tokens, d // 2, generator=gen).to(DEVICE) * 1000
    cos_tf, sin_tf = angles_tf.cos().to(dtype), angles_tf.sin().to(dtype)
    num_pages = tokens // page + 3
    slots_t = torch.randperm(num_pages * page, generator=gen)[:tokens].to(DEVICE)
    slots_t[1] = -1  # a padding token
    k_cache = nan_like((num_pages, page, hkv, d), dtype)
    v_cache = nan_like((num_pages, page, hkv, d), dtype)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    k_out = nan_like(k_thd.shape, dtype) if with_k_out else None
    K.rope_and_cache_kv(k_thd, v_thd, cos_tf, sin_tf, slots_t, k_cache, v_cache, k_out=k_out)
    ref_k = K.rope_and_cache_kv_ref(k_thd, v_thd, cos_tf, sin_tf, slots_t, ref_k_cache,
                                    ref_v_cache)
    exact = {"rtol": 0, "atol": 0, "equal_nan": True}
    torch.testing.assert_close(k_cache, ref_k_cache, **exact)
    torch.testing.assert_close(v_cache, ref_v_cache, **exact)
    written = slots_t[slots_t >= 0].long()
    assert not k_cache.flatten(0, 1)[written].isnan().any()
    assert k_cache.flatten(0, 1).isnan().any(dim=(1, 2)).sum() == num_pages * page - len(written)
    if with_k_out:
        torch.testing.assert_close(k_out, ref_k, rtol=0, atol=0)


# ---------------------------------------------------------------- package surface


def test_bad_shapes_raise_value_error() -> None:
    q_thd = torch.zeros(4, 3, 16, device=DEVICE)
    kv_thd = torch.zeros(4, 2, 16, device=DEVICE)
    cu = cu_seqlens([4])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        K.prefill_attention(q_thd, kv_thd, kv_thd, cu, cu, 4, 4, True, 0.25)
    with pytest.raises(ValueError, match="lse shape"):
        K.merge_attention_partials(torch.zeros(2, 3, 4, 8), torch.zeros(2, 3, 4))


def test_triton_available_and_import_without_triton() -> None:
    assert K.triton_available()
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import sp_serve_kernels as K\n"
        "assert not K.triton_available()\n"
        "try:\n    K.prefill_attention()\nexcept RuntimeError as e:\n    assert 'Triton' in str(e)\n"
        "else:\n    raise AssertionError('expected RuntimeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_checkout_does_not_shadow_pypi_kernels():
    """From the checkout's root (on sys.path under `python -m`, `-c` and pytest) `import kernels`
    is PyPI's package, which transformers imports when it is installed (transformers >= 5.25
    depends on it); sp-serve's own kernels are `sp_serve_kernels` either way."""
    import importlib.metadata

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import kernels, sp_serve_kernels, transformers.activations; "
            "print(kernels.__file__); print(sp_serve_kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    pypi_file, ours = out.stdout.split()
    assert ours.endswith(os.path.join("kernels", "__init__.py"))
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:  # nothing to shadow: the folder is found
        assert pypi_file == ours
    else:
        assert pypi_file != ours and not pypi_file.startswith(os.path.join(root, "")), pypi_file
