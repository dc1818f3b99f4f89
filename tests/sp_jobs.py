"""Work run inside spawned ranks by the multi-rank tests (importable by spawn's children)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from sp_serve.attention.ring_prefill import ring_prefill_attention
from sp_serve.attention.zigzag import ZigzagLayout
from sp_serve.engine.plan import DecodeToken, PrefillChunk, StepPlan
from sp_serve.engine.worker import Worker
from sp_serve.kv.block_manager import BlockManager
from sp_serve.kv.cache import PagedKVCache
from sp_serve.model.llama import TensorParallel
from sp_serve.model.loader import load_model


def engine_jobs(pc, jobs):
    """jobs: [(ckpt_dir, prompt_ids, num_decode, chunk_split | None[, attention backend[,
    kv cache dtype]])]. Rank 0 drives plans like the engine does (with TP, each rank loads its
    share of the model); returns [(last prompt-token
    logits, greedy tokens, tokens per rank)] per job."""
    results = []
    for ckpt, prompt, num_decode, split, *extra in jobs:
        backend = extra[0] if extra else "torch"
        kv_cache_dtype = extra[1] if len(extra) > 1 else "auto"
        model, _ = load_model(ckpt, dtype=torch.float32,
                              tp=TensorParallel(pc.tp_rank, pc.tp_size, pc.tp_comm))
        spec = model.local_spec  # this rank's heads (all of them without TP)
        blocks_per_rank, block = 96, 4  # small blocks: sequences span many blocks
        kv = PagedKVCache(spec.num_layers, blocks_per_rank, block, spec.num_kv_heads, spec.head_dim,
                          torch.float32, pc.device, kv_cache_dtype)
        worker = Worker(pc, model, spec, kv, backend)
        if pc.rank != 0:
            _follow(pc, worker)
            assert kv.num_free_blocks == blocks_per_rank, "a rank kept blocks of a freed sequence"
            continue
        bm = BlockManager(pc.sp_size, blocks_per_rank, block)

        def run(plan):
            if pc.world_size > 1:
                dist.broadcast_object_list([plan], src=0, group=pc.control_group)
            return worker.execute(plan)

        n = len(prompt)
        bounds = [(0, n)] if split is None else [(0, split), (split, n)]
        for a, b in bounds:
            bm.allocate(0, bm.prefill_shares(b - a))
            logits = run(StepPlan(prefill=[PrefillChunk(0, prompt[a:b], a, b == n, n)]))
        first = logits[0].clone()
        tokens = [int(first.argmax())]
        for i in range(num_decode - 1):
            owner = bm.decode_rank(0)
            bm.allocate(0, [int(r == owner) for r in range(pc.sp_size)])
            logits = run(StepPlan(decode=[DecodeToken(0, tokens[-1], n + i, owner)]))
            tokens.append(int(logits[0].argmax()))
        per_rank = list(bm.tokens[0])
        run(StepPlan(free_seq_ids=[0], shutdown=True))
        assert kv.num_free_blocks == blocks_per_rank
        results.append((first, tokens, per_rank))
    return results


def reference_attention(q_thd, k_thd, v_thd, scale, causal=True):
    """float64 full attention (GQA by repetition): o [T, H, D], lse [T, H]."""
    group = q_thd.shape[1] // k_thd.shape[1]
    k = k_thd.double().repeat_interleave(group, 1)
    v = v_thd.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q_thd.double(), k) * scale
    if causal:
        tq, tk = s.shape[1], s.shape[2]
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(tk - tq + 1), -math.inf)
    lse = torch.logsumexp(s, -1)
    o = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1).nan_to_num(0.0), v)
    return o, lse.T


def ring_jobs(pc, cases):
    """cases: [(n, hq, hkv, d, seed)]. Each rank runs ring attention on its zigzag share; rank 0
    gathers all shares and returns the max errors vs full causal attention."""
    errors = []
    for n, hq, hkv, d, seed in cases:
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(n, h, d, generator=g) for h in (hq, hkv, hkv))
        layout = ZigzagLayout(n, pc.world_size)
        idx = layout.local_indices(pc.rank)
        acc = ring_prefill_attention(pc, layout, q[idx], k[idx], v[idx], d ** -0.5)
        parts = [None] * pc.world_size
        dist.all_gather_object(parts, (idx, acc.o_thd, acc.lse_th))
        o = torch.empty(n, hq, d)
        lse = torch.empty(n, hq)
        for i, oo, ll in parts:
            o[i], lse[i] = oo, ll
        ref_o, ref_lse = reference_attention(q, k, v, d ** -0.5)
        errors.append((float((o - ref_o).abs().max()), float((lse - ref_lse).abs().max()),
                       bool(torch.isfinite(o).all())))
    return errors


def decode_jobs(pc, cases):
    """cases: [(shard_lens per rank, hq, hkv, d, seed)] for one query each: every rank attends to
    its shard only; the merged result must equal attention over the union."""
    from sp_serve.attention.local import attention_with_lse
    from sp_serve.attention.sharded_cache import decode_over_shards, pack_partial
    errors = []
    for shard_lens, hq, hkv, d, seed in cases:
        g = torch.Generator().manual_seed(seed)
        batch = len(shard_lens)
        q = torch.randn(batch, hq, d, generator=g)
        shards = [[(torch.randn(lens[r], hkv, d, generator=g), torch.randn(lens[r], hkv, d, generator=g))
                   for r in range(pc.world_size)] for lens in shard_lens]

        def local_partial(rows):
            out = []
            for b in range(rows.start, rows.stop):
                k, v = shards[b][pc.rank]
                out.append(pack_partial(*attention_with_lse(q[b:b + 1], k, v, False, d ** -0.5)))
            return torch.cat(out)

        o = decode_over_shards(pc, batch, local_partial)
        err = 0.0
        for b in range(batch):
            k = torch.cat([s[0] for s in shards[b]])
            v = torch.cat([s[1] for s in shards[b]])
            if k.shape[0] == 0:
                err = max(err, float(o[b].abs().max()))
                continue
            ref_o, _ = reference_attention(q[b:b + 1], k, v, d ** -0.5, causal=False)
            err = max(err, float((o[b] - ref_o[0]).abs().max()))
        errors.append((err, bool(torch.isfinite(o).all())))
    return errors


def comm_jobs(pc, region_bytes: int | None = None):
    """Every Communicator collective with shapes that differ by rank, empty blocks and (when
    region_bytes is given) shared-memory messages bigger than a region, against what the
    inputs say the answer is. Returns rank 0's list of (name, ok)."""
    comm = pc.comm
    if region_bytes is not None:
        from sp_serve.parallel.shm import ShmComm
        comm = ShmComm(pc.rank, pc.world_size, pc.control_group, 60.0, region_bytes)
    n, r = pc.world_size, pc.rank

    def data(rank, rows, seed=0):  # what rank `rank` sends, known to every rank
        g = torch.Generator().manual_seed(1000 * seed + rank)
        return torch.randn(rows, 3, 5, generator=g)

    results = []
    for rows in (1, 7, 300):
        got = comm.all_gather(data(r, rows))
        results.append((f"all_gather {rows}", torch.equal(got, torch.cat([data(k, rows) for k in range(n)]))))
    for w in (1, 5, 200):
        mine = data(r, n * w, seed=1)
        got = comm.all_to_all(mine)
        want = torch.cat([data(k, n * w, seed=1)[r * w:(r + 1) * w] for k in range(n)])
        results.append((f"all_to_all {w}", torch.equal(got, want)))
    for lens in ([3] * n, list(range(n)), [0] * n, [400 + 37 * k for k in range(n)]):
        seen = {}
        for src, block in comm.ring(data(r, lens[r], seed=2), lambda k: (lens[k], 3, 5)):
            seen[src] = block.clone()
        order_ok = list(seen) == [(r - s) % n for s in range(n)]
        results.append((f"ring {lens}", order_ok and all(
            torch.equal(seen[k], data(k, lens[k], seed=2)) for k in range(n))))
    rows = torch.zeros(n, 4)
    rows[r] = r + 1.5  # each rank owns one row
    total = comm.sum_to_first(rows)
    results.append(("sum_to_first", r != 0 or torch.equal(total, torch.arange(n)[:, None] + 1.5 + torch.zeros(n, 4))))
    if comm is not pc.comm:
        comm.close()
    return results


def _follow(pc, worker) -> None:
    """Ranks > 0: execute rank 0's plans until shutdown."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=pc.control_group)
        worker.execute(box[0])
        if box[0].shutdown:
            return


def mixed_step_jobs(pc, jobs, splits, num_decode):
    """jobs: [(ckpt, prompts)]; mixed_steps for each, in one spawn."""
    return [mixed_steps(pc, ckpt, prompts, splits, num_decode) for ckpt, prompts in jobs]


def mixed_steps(pc, ckpt, prompts, splits, num_decode):
    """Several sequences in the same steps, as the schedulers run them: sequence i's prompt is
    prefilled in chunks ending at splits[i] (awkward places), step by step, while the sequences
    whose prompts are done decode in those same steps. Returns rank 0's [(first-token logits,
    greedy tokens)] per sequence; every rank checks its pool is empty at the end."""
    model, spec = load_model(ckpt, dtype=torch.float32)
    blocks_per_rank, block = 256, 4
    kv = PagedKVCache(spec.num_layers, blocks_per_rank, block, spec.num_kv_heads, spec.head_dim,
                      torch.float32, pc.device)
    worker = Worker(pc, model, spec, kv)
    if pc.rank != 0:
        _follow(pc, worker)
        assert kv.num_free_blocks == blocks_per_rank, "a rank kept blocks of a freed sequence"
        return None
    bm = BlockManager(pc.world_size, blocks_per_rank, block)
    bounds = [list(zip([0, *cuts], [*cuts, len(p)])) for p, cuts in zip(prompts, splits)]
    first: dict[int, torch.Tensor] = {}
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}

    def run(plan):
        if pc.world_size > 1:
            dist.broadcast_object_list([plan], src=0, group=pc.control_group)
        return worker.execute(plan)

    while any(len(t) < num_decode for t in tokens.values()):
        chunks, decode = [], []
        for i, p in enumerate(prompts):
            if bounds[i]:  # one chunk of each unfinished prompt per step
                a, b = bounds[i].pop(0)
                bm.allocate(i, bm.prefill_shares(b - a))
                chunks.append(PrefillChunk(i, p[a:b], a, b == len(p), len(p)))
            elif 0 < len(tokens[i]) < num_decode:
                owner = bm.decode_rank(i)
                bm.allocate(i, [int(r == owner) for r in range(pc.world_size)])
                decode.append(DecodeToken(i, tokens[i][-1], len(p) + len(tokens[i]) - 1, owner))
        logits = run(StepPlan(prefill=chunks, decode=decode))
        for c in chunks:
            if c.want_logits:
                first[c.seq_id] = logits[c.seq_id].clone()
                tokens[c.seq_id].append(int(logits[c.seq_id].argmax()))
        for d in decode:
            tokens[d.seq_id].append(int(logits[d.seq_id].argmax()))
    run(StepPlan(free_seq_ids=list(range(len(prompts))), shutdown=True))
    assert kv.num_free_blocks == blocks_per_rank
    return [(first[i], tokens[i]) for i in range(len(prompts))]
