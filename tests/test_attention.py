"""Ring attention and sharded decode against plain full attention (float64 reference), on real
gloo ranks; the lse merge and the zigzag layout as plain functions."""
from __future__ import annotations

import math
import os

import pytest
import torch

from sp_serve.attention.local import attention_over_pieces, attention_with_lse
from sp_serve.attention.merge import PartialAccumulator, merge_partials
from sp_serve.attention.sharded_cache import DecodeShards
from sp_serve.attention.zigzag import ZigzagLayout
from sp_serve.kv.cache import PagedKVCache
from tests.dist_util import run_on_ranks
from tests.sp_jobs import (
    decode_jobs,
    engine_jobs,
    paged_decode_jobs,
    reference_attention,
    ring_jobs,
)

RING_CASES = [  # (tokens, q heads, kv heads, head_dim, seed): odd lengths, n < 2N, GQA/MQA/MHA
    (1, 4, 2, 16, 0), (2, 4, 4, 16, 1), (5, 4, 1, 16, 2), (7, 8, 2, 32, 3),
    (33, 4, 2, 16, 4), (97, 6, 3, 16, 5), (128, 4, 4, 64, 6), (301, 8, 1, 32, 7),
]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_attention_matches_full_causal(world):
    errors = run_on_ranks(world, ring_jobs, RING_CASES)
    for case, (o_err, lse_err, finite) in zip(RING_CASES, errors):
        assert finite, case
        assert o_err < 1e-5 and lse_err < 1e-5, (case, o_err, lse_err)


def test_sharded_decode_unequal_and_empty_shards():
    world = 3
    cases = [  # per batch entry: tokens each rank holds
        ([[5, 0, 0], [0, 0, 1], [7, 3, 11], [0, 9, 0]], 4, 2, 16, 0),
        ([[1, 1, 1]], 8, 1, 32, 1),
        ([[40, 0, 13], [2, 2, 0], [0, 0, 0]], 4, 4, 16, 2),  # last: every shard empty
    ]
    errors = run_on_ranks(world, decode_jobs, cases)
    for case, (err, finite) in zip(cases, errors):
        assert finite, case
        assert err < 1e-5, (case, err)


def test_merge_partials_with_empty_shards():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 8, generator=g)
    k = torch.randn(10, 2, 8, generator=g)
    v = torch.randn(10, 2, 8, generator=g)
    splits = [(0, 0), (0, 4), (4, 4), (4, 10), (10, 10)]  # empty partials in between
    parts = [attention_with_lse(q, k[a:b], v[a:b], False, 0.3) for a, b in splits]
    o, lse = merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    ref_o, ref_lse = reference_attention(q, k, v, 0.3, causal=False)
    assert torch.allclose(o.double(), ref_o, atol=1e-5) and torch.allclose(lse.double(), ref_lse, atol=1e-5)
    # the running accumulator agrees, and all-empty stays o = 0, lse = -inf, no NaN
    acc = PartialAccumulator(*parts[0])
    for p in parts[1:]:
        acc.add(slice(None), *p)
    assert torch.allclose(acc.o_thd, o, atol=1e-6)
    empty = [attention_with_lse(q, k[:0], v[:0], False, 0.3)] * 3
    o0, lse0 = merge_partials(torch.stack([p[0] for p in empty]), torch.stack([p[1] for p in empty]))
    assert not torch.isnan(o0).any() and (o0 == 0).all() and torch.isinf(lse0).all()


@pytest.mark.parametrize("causal,hq,hkv", [(True, 4, 4), (True, 6, 2), (False, 4, 1), (False, 8, 2)])
def test_local_attention_with_lse(causal, hq, hkv):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    tq, tk = (13, 13) if causal else (9, 21)
    q, k, v = torch.randn(tq, hq, 16, generator=g), torch.randn(tk, hkv, 16, generator=g), torch.randn(tk, hkv, 16, generator=g)
    o, lse = attention_with_lse(q, k, v, causal, 1 / math.sqrt(16))
    ref_o, ref_lse = reference_attention(q, k, v, 0.25, causal)
    assert (o.double() - ref_o).abs().max() < 1e-5 and (lse.double() - ref_lse).abs().max() < 1e-5


@pytest.mark.parametrize("n,world", [(0, 2), (1, 4), (7, 4), (8, 4), (301, 3), (1000, 8)])
def test_zigzag_layout_partitions_and_balances(n, world):
    layout = ZigzagLayout(n, world)
    all_idx = torch.cat([layout.local_indices(r) for r in range(world)]).sort().values
    assert all_idx.tolist() == list(range(n))
    for r in range(world):
        idx = layout.local_indices(r)
        assert (idx[1:] > idx[:-1]).all()  # local order is global order: step 0 is plain causal
        for i in idx.tolist():
            assert layout.owner_of(i) == r
    # causal work (sum of positions + 1): the remainder tokens shift later chunks by at most one
    # position each, so ranks differ by at most ~n pairs out of ~n^2 / (2N)
    work = [float((layout.local_indices(r) + 1).sum()) for r in range(world)]
    if n >= 2 * world:  # with fewer tokens than chunks some ranks are necessarily idle
        assert max(work) - min(work) <= n


def test_triton_backend_matches_torch_under_interpreter():
    """The Triton path the engine takes on CUDA, run by Triton's CPU interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 (scripts/test.sh does) to run Triton kernels on the CPU")
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(11)
    for causal, tq, tk, hq, hkv in [(True, 9, 9, 4, 2), (False, 5, 12, 4, 1), (False, 1, 17, 8, 2)]:
        q, k, v = (torch.randn(t, h, 16, generator=g) for t, h in ((tq, hq), (tk, hkv), (tk, hkv)))
        o_t, lse_t = attention_with_lse(q, k, v, causal, 0.25, backend="triton")
        o_r, lse_r = attention_with_lse(q, k, v, causal, 0.25)
        assert torch.allclose(o_t, o_r, atol=1e-4) and torch.allclose(lse_t, lse_r, atol=1e-4)


def test_backend_choice_on_cpu():
    from sp_serve.attention.backend import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    for forced in ("triton", "flash-attn"):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            resolve_backend(forced, torch.device("cpu"))


def _needs_triton_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 (scripts/test.sh does) to run Triton kernels on CPU")
    pytest.importorskip("triton")


@pytest.mark.parametrize("num_splits", [None, 3])
def test_triton_decode_reads_paged_pool_like_torch_path(num_splits, monkeypatch):
    """The decode partials of the triton backend (the paged split-KV kernel over the pool, in
    place) equal the torch path's (gather, then attend one sequence at a time): shards in
    scattered, reused blocks, one longer than a kernel step, one empty (lse -inf)."""
    _needs_triton_interpreter()
    import sp_serve_kernels.decode_attention as decode_kernel
    if num_splits is not None:  # several splits: the kernel merges them into the packed layout
        monkeypatch.setattr(decode_kernel, "default_num_splits", lambda *args: num_splits)
    g = torch.Generator().manual_seed(21)
    layers, hq, hkv, d, block = 2, 4, 2, 16, 4
    kv = PagedKVCache(layers, 40, block, hkv, d, torch.float32, torch.device("cpu"))
    kv.k_lthd.copy_(torch.randn(kv.k_lthd.shape, generator=g))  # every slot random, so a
    kv.v_lthd.copy_(torch.randn(kv.v_lthd.shape, generator=g))  # wrong block gives wrong numbers
    for seq, n in [(1, 5), (9, 6), (2, 3), (1, 4), (3, 9), (9, 2), (2, 7), (1, 3), (3, 30)]:
        kv.append_slots(seq, n)
    kv.free(9)
    kv.append_slots(2, 6)  # reuses the freed blocks
    seq_ids = [3, 4, 1, 2]  # 4 has nothing on this rank
    assert [kv.num_tokens(s) for s in seq_ids] == [39, 0, 12, 16]
    assert kv.block_table(2) != sorted(kv.block_table(2))  # blocks out of order
    q_bhd = torch.randn(len(seq_ids), hq, d, generator=g)
    triton = DecodeShards(kv, seq_ids, 0.25, "triton")
    torch_path = DecodeShards(kv, seq_ids, 0.25, "torch")
    assert triton.tables_bm.dtype == triton.lens_b.dtype == torch.int32
    for layer in range(layers):
        for rows in (slice(0, 4), slice(1, 3), slice(3, 4)):  # micro-batches are row slices
            got, want = triton.partial(layer, q_bhd, rows), torch_path.partial(layer, q_bhd, rows)
            assert got.shape == want.shape == (rows.stop - rows.start, hq, d + 1)
            assert got.dtype == want.dtype == torch.float32
            torch.testing.assert_close(got[..., :-1], want[..., :-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[..., -1], want[..., -1], rtol=1e-5, atol=1e-5)
        empty = triton.partial(layer, q_bhd, slice(1, 2))
        assert torch.isneginf(empty[..., -1]).all() and (empty[..., :-1] == 0).all()


def test_engine_triton_backend_matches_torch_at_sp2(tiny_model_dir):
    """SP=2 on the tiny model, the worker driven like the engine: a chunked prompt, then greedy
    decode; the triton backend (ring prefill, cached-chunk and paged decode kernels, all in the
    interpreter) gives the torch backend's logits and tokens. (Not through `LLM`: on CPU
    resolve_backend refuses --attn-backend triton, so the Worker is given the backend here.)"""
    _needs_triton_interpreter()
    prompt = torch.randint(3, 200, (23,), generator=torch.Generator().manual_seed(5)).tolist()
    job = (str(tiny_model_dir), prompt, 6, 9)
    (logits_torch, tokens_torch, _), (logits_triton, tokens_triton, _) = run_on_ranks(
        2, engine_jobs, [(*job, "torch"), (*job, "triton")])
    torch.testing.assert_close(logits_triton, logits_torch, rtol=1e-4, atol=1e-4)
    assert tokens_triton == tokens_torch


def test_kv_pool_hands_out_lowest_free_blocks_so_a_lone_sequence_is_one_run():
    kv = PagedKVCache(1, 12, 4, 1, 2, torch.float32, torch.device("cpu"))
    for seq in range(4):  # four sequences of two blocks each, interleaved
        kv.append_slots(seq, 4)
    for seq in range(4):
        kv.append_slots(seq, 4)
    for seq in (1, 3, 0, 2):  # all gone, in a shuffled order (as after calibration)
        kv.free(seq)
    kv.append_slots(9, 16)  # four blocks: the lowest free ones, 0 1 2 3, in order
    assert kv.block_table(9) == [0, 1, 2, 3]
    assert kv.runs(9) == [(0, 16)]
    k, _ = kv.read_runs(0, kv.runs(9))
    assert k.data_ptr() == kv.k_lthd[0].data_ptr()  # a view of the pool, not a copy
    kv.free(9)
    assert kv.num_free_blocks == 12


def test_attention_over_a_fragmented_shard_reads_the_longest_run_in_place():
    torch.manual_seed(0)
    kv = PagedKVCache(1, 16, 4, 2, 8, torch.float64, torch.device("cpu"))
    kv.k_lthd.normal_()
    kv.v_lthd.normal_()
    kv.append_slots(0, 10)  # blocks 0-2
    kv.append_slots(1, 4)   # block 3
    kv.append_slots(0, 9)   # blocks 4-5 after the 2 free slots of block 2: runs (0, 12) (16, 23)
    kv.append_slots(1, 4)   # block 6
    kv.append_slots(0, 3)   # block 6 is taken: (28, 31) is a third run
    runs = kv.runs(0)
    assert len(runs) == 3
    pieces = kv.read_pieces(0, runs)
    assert len(pieces) == 2 and pieces[0][0].data_ptr() == kv.k_lthd[0, runs[0][0]].data_ptr()
    q = torch.randn(3, 4, 8, dtype=torch.float64)
    k_all, v_all = kv.read_runs(0, runs)
    want_o, want_lse = attention_with_lse(q, k_all, v_all, False, 0.3)
    got_o, got_lse = attention_over_pieces(q, pieces, 0.3)
    torch.testing.assert_close(got_o.double(), want_o, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_lse.double(), want_lse.double(), atol=1e-6, rtol=0)


def test_kv_pool_keeps_a_chunked_prompt_consecutive_beside_decode_growth():
    kv = PagedKVCache(1, 64, 4, 1, 2, torch.float32, torch.device("cpu"))
    for step in range(6):  # a prompt chunk of 10 and two decode tokens per step
        kv.append_slots(0, 10)
        for seq in (1, 2):
            kv.append_slots(seq, 4, decode=True)
    assert kv.runs(0) == [(0, 60)]  # one run: the decode blocks came from the top
    assert kv.block_table(1)[0] == 63


@pytest.mark.parametrize("seed", range(5))
def test_kv_pool_random_operations_never_hand_out_a_block_twice(seed):
    import random
    rng = random.Random(seed)
    kv = PagedKVCache(1, 40, 4, 1, 2, torch.float32, torch.device("cpu"))
    for _ in range(400):
        seq = rng.randrange(6)
        if rng.random() < 0.25:
            kv.free(seq)
        else:
            need = -(-(kv.num_tokens(seq) + 3) // 4) - len(kv.block_table(seq))
            if need <= kv.num_free_blocks:
                kv.append_slots(seq, 3, decode=rng.random() < 0.5)
        held = [b for s in range(6) for b in kv.block_table(s)]
        assert len(held) == len(set(held)) and kv.num_free_blocks == 40 - len(held)
    for seq in range(6):
        kv.free(seq)
    assert kv.num_free_blocks == 40
    kv.append_slots(7, 160)  # the whole pool, in order, after all that churn
    assert kv.runs(7) == [(0, 160)]


def _paged_decode_cases(world: int) -> list:
    """Uneven shards per rank, empty shards, a sequence empty on every rank, one token, GQA,
    MQA and MHA, quantized caches; default piece sizes and small ones (several pieces and
    groups per sequence, padding)."""
    per_seq = [[5, 0, 0], [0, 0, 1], [37, 3, 11], [0, 9, 0], [0, 0, 0], [70, 2, 40], [16, 16, 16]]
    lens = [[n[r % 3] + (r // 3) for r in range(world)] for n in per_seq]  # any world size
    small, default = (8, 4, 24), (1024, 256, 2048)
    return [(lens, 6, 2, 16, "auto", 0, default), (lens, 6, 2, 16, "auto", 1, small),
            (lens, 4, 1, 16, "auto", 2, small), (lens[2:5], 4, 4, 32, "auto", 3, (4, 0, 4)),
            (lens, 6, 2, 16, "int8", 4, small), (lens, 6, 2, 16, "fp8", 5, small),
            (lens, 6, 2, 16, "fp8_e5m2", 6, default)]


@pytest.mark.parametrize("world,cpu_comm", [(1, "auto"), (2, "auto"), (3, "auto"), (2, "gloo")])
def test_sharded_decode_over_paged_pools_matches_reference(world, cpu_comm):
    """The torch backend's batched decode (attention/batched_decode.py) on real ranks' paged
    pools (fragmented shards, never-written slots NaN), merged across ranks (gloo: in
    micro-batches, each attending its rows): o equals the float64 reference over the union of
    the shards as stored, each rank's lse its shard's; empty shards give lse = -inf and o = 0
    (weight 0), never NaN."""
    cases = _paged_decode_cases(world)
    errors = run_on_ranks(world, paged_decode_jobs, cases, cpu_comm=cpu_comm)
    for case, (o_err, lse_err, finite, empty_ok) in zip(cases, errors):
        name = (case[4], case[6], case[1:3])
        assert finite and empty_ok, name
        assert o_err < 1e-5 and lse_err < 1e-5, (name, o_err, lse_err)


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "fp8", "fp8_e5m2"])
@pytest.mark.parametrize("sizes", [(1024, 256, 2048), (8, 4, 24), (4, 0, 1000), (64, 0, 64)])
def test_batched_decode_matches_reference_and_the_per_sequence_path(kv_dtype, sizes, monkeypatch):
    """One rank's pool as an engine leaves it: prompts chunked between other sequences,
    decode tails apart from their prompts, a shared prefix (its partly used last block
    copied), an empty shard, a one-token one, one block exactly; slots never written NaN. The
    batched partials, for the whole batch and for micro-batches (row slices), equal the float64
    reference on the stored (dequantized) K/V, and the per-sequence path they replaced."""
    from sp_serve.attention import batched_decode
    from sp_serve.attention.sharded_cache import pack_partial
    from tests.sp_jobs import fill_pool
    for name, value in zip(("PIECE_TOKENS", "MAX_PADDING", "GROUP_TOKENS"), sizes):
        monkeypatch.setattr(batched_decode, name, value)
    layers, hq, hkv, d = 2, 6, 2, 16
    kv = PagedKVCache(layers, 64, 4, hkv, d, torch.float32, torch.device("cpu"), kv_dtype)
    stored = fill_pool(kv, {1: 1, 2: 4, 3: 47, 4: 22, 6: 90}, 0.6, 7, layers)
    # 5 shares 3's first 10 tokens (2 full blocks shared, the third copied), then adds its own
    kv.apply([("share", 5, 3, [10])], 0)
    g = torch.Generator().manual_seed(8)
    own = [(torch.randn(3, hkv, d, generator=g), torch.randn(3, hkv, d, generator=g))
           for _ in range(layers)]
    slots = kv.append_slots(5, 3)
    stored[5] = []
    for layer in range(layers):
        k, v = kv.write(layer, slots, *own[layer])
        stored[5].append((torch.cat([stored[3][layer][0][:10], k]),
                          torch.cat([stored[3][layer][1][:10], v])))
    seq_ids = [3, 0, 1, 5, 2, 6, 4]  # 0 holds nothing
    stored[0] = [(torch.zeros(0, hkv, d), torch.zeros(0, hkv, d))] * layers
    assert len(kv.runs(3)) > 1 and len(kv.runs(4)) > 1 and kv.num_tokens(0) == 0
    q_bhd = torch.randn(len(seq_ids), hq, d, generator=g)
    shards = DecodeShards(kv, seq_ids, 0.25, "torch")
    assert not shards.paged
    layout = batched_decode.BatchedDecodeShards(kv, seq_ids)
    assert any(g.pad is not None for g in layout.groups)  # padding past a shard's last token
    if sizes[0] < 90:
        assert layout.where.shape[0] > 1  # a shard cut into pieces, merged by lse
    if sizes[2] < 90:
        assert len(layout.groups) > 3
    for layer in range(layers):
        for rows in (slice(0, 7), slice(1, 4), slice(6, 7), slice(1, 2)):
            got = shards.partial(layer, q_bhd, rows)
            assert got.shape == (rows.stop - rows.start, hq, d + 1) and got.dtype == torch.float32
            assert not torch.isnan(got).any()
            for i, b in enumerate(range(rows.start, rows.stop)):
                seq = seq_ids[b]
                k, v = stored[seq][layer]
                if k.shape[0] == 0:
                    assert torch.isneginf(got[i, :, -1]).all() and (got[i, :, :-1] == 0).all()
                    continue
                ref_o, ref_lse = reference_attention(q_bhd[b:b + 1], k, v, 0.25, causal=False)
                torch.testing.assert_close(got[i, :, :-1].double(), ref_o[0], rtol=0, atol=1e-5)
                torch.testing.assert_close(got[i, :, -1].double(), ref_lse[0], rtol=0, atol=1e-5)
                old = pack_partial(*attention_over_pieces(
                    q_bhd[b:b + 1], kv.read_pieces(layer, kv.runs(seq)), 0.25))[0]
                torch.testing.assert_close(got[i], old, rtol=1e-5, atol=1e-5)


def test_attend_math_equals_the_cpu_flash_kernel():
    """The batched path's attention off CPU (plain fp32 math) equals torch's CPU flash kernel,
    masks and strided K/V included."""
    from sp_serve.attention.batched_decode import attend, attend_math
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, 3, 16, generator=g)
    k = torch.randn(3, 20, 2, 16, generator=g).transpose(1, 2)
    v = torch.randn(3, 20, 2, 16, generator=g).transpose(1, 2)
    mask = torch.zeros(3, 1, 1, 20)
    mask[0, ..., 7:] = float("-inf")
    mask[2, ..., 1:] = float("-inf")
    for m in (mask, None):
        o1, lse1 = attend(q, k, v, m, 0.3)
        o2, lse2 = attend_math(q, k, v, m, 0.3)
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse1, lse2, rtol=1e-5, atol=1e-5)
