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


def fill_pool(kv, seq_lens: dict[int, int], prompt_frac: float, seed: int, layers: int,
              kv_full: dict[int, list] | None = None):
    """Writes sequences into a pool as an engine leaves them, every slot never written NaN
    first (0x7f bytes: NaN in both fp8 formats; NaN scales): each sequence's first
    `prompt_frac` tokens as a prompt (lowest free blocks), in two chunks between which the
    other sequences' prompts are written, then the rest one decode token at a time, round
    robin (highest free blocks). K/V of token i of a sequence: kv_full[seq][layer] rows
    (random if not given). Returns {seq: [(k, v) as stored (dequantized) per layer]}."""
    for t in kv._tensors():
        t.view(torch.uint8).fill_(0x7F) if t.element_size() == 1 else t.fill_(float("nan"))
    hkv, d = kv.k_lthd.shape[2:]
    g = torch.Generator().manual_seed(seed)
    if kv_full is None:
        kv_full = {s: [(torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g))
                       for _ in range(layers)] for s, n in seq_lens.items()}
    stored: dict[int, list] = {s: [([], []) for _ in range(layers)] for s in seq_lens}
    done = dict.fromkeys(seq_lens, 0)

    def write(seq: int, count: int, decode: bool) -> None:
        a = done[seq]
        slots = kv.append_slots(seq, count, decode=decode)
        for layer in range(layers):
            k, v = kv_full[seq][layer]
            sk, sv = kv.write(layer, slots, k[a:a + count], v[a:a + count])
            stored[seq][layer][0].append(sk)
            stored[seq][layer][1].append(sv)
        done[seq] += count

    prompt = {s: int(n * prompt_frac) for s, n in seq_lens.items()}
    for half in (0, 1):
        for s in seq_lens:
            count = prompt[s] // 2 if half == 0 else prompt[s] - done[s]
            if count:
                write(s, count, False)
    while any(done[s] < n for s, n in seq_lens.items()):
        for s, n in seq_lens.items():
            if done[s] < n:
                write(s, 1, True)
    hd = (0, hkv, d)
    return {s: [(torch.cat(k) if k else torch.zeros(hd), torch.cat(v) if v else torch.zeros(hd))
                for k, v in per_layer] for s, per_layer in stored.items()}


def paged_decode_jobs(pc, cases):
    """cases: [(tokens of each sequence on each rank [[r0, r1, ..], ..], hq, hkv, d, kv cache
    dtype, seed, (PIECE_TOKENS, MAX_PADDING, GROUP_TOKENS))]: every rank writes its shards into
    its own paged pool (fragmented, slots never written NaN) and attends the batch with
    `DecodeShards` (the torch backend's batched path), merged across ranks by
    `decode_over_shards` as the worker does. Returns, per case, the worst over ranks of: max
    |merged o - float64 reference over the union of the shards as stored|, max |lse of the
    rank's own partial - the reference over its shard|, every o finite, and empty sequences
    o = 0, empty shards o = 0 and lse = -inf."""
    from sp_serve.attention import batched_decode
    from sp_serve.attention.sharded_cache import DecodeShards, decode_over_shards
    from sp_serve.kv.quant import dequantize, kv_format, quantize
    results = []
    layers = 2
    for lens, hq, hkv, d, kv_dtype, seed, sizes in cases:
        # small pieces, padding and groups: a sequence spans several of each
        (batched_decode.PIECE_TOKENS, batched_decode.MAX_PADDING,
         batched_decode.GROUP_TOKENS) = sizes
        g = torch.Generator().manual_seed(seed)
        batch, scale = len(lens), d ** -0.5
        full = {s: [tuple(torch.randn(sum(n), hkv, d, generator=g) for _ in "kv")
                    for _ in range(layers)] for s, n in enumerate(lens)}
        q = torch.randn(batch, hq, d, generator=g)
        start = {s: sum(n[:pc.rank]) for s, n in enumerate(lens)}
        mine = {s: [(k[start[s]:start[s] + n[pc.rank]], v[start[s]:start[s] + n[pc.rank]])
                    for k, v in full[s]] for s, n in enumerate(lens)}
        kv = PagedKVCache(layers, 64, 4, hkv, d, torch.float32, pc.device, kv_dtype)
        fill_pool(kv, {s: n[pc.rank] for s, n in enumerate(lens)}, 0.6, seed, layers, mine)

        def as_stored(x):  # what every rank stores and reads back
            if kv_dtype == "auto":
                return x
            return dequantize(*quantize(x, kv_format(kv_dtype)), torch.float32)

        shards = DecodeShards(kv, list(range(batch)), scale, "torch", paged=False)
        o_err = lse_err = 0.0
        finite = empty_ok = True
        for layer in range(layers):
            o = decode_over_shards(pc, batch, lambda rows: shards.partial(layer, q, rows))
            finite &= bool(torch.isfinite(o).all())
            part = shards.partial(layer, q, slice(0, batch))  # this rank's own partial
            for s in range(batch):
                k, v = (as_stored(x) for x in full[s][layer])
                if k.shape[0] == 0:
                    empty_ok &= bool((o[s] == 0).all())
                else:
                    ref_o, _ = reference_attention(q[s:s + 1], k, v, scale, causal=False)
                    o_err = max(o_err, float((o[s] - ref_o[0]).abs().max()))
                k, v = (as_stored(x) for x in mine[s][layer])
                if k.shape[0] == 0:
                    empty_ok &= bool(torch.isneginf(part[s, :, -1]).all()
                                     and (part[s, :, :-1] == 0).all())
                else:
                    _, ref_lse = reference_attention(q[s:s + 1], k, v, scale, causal=False)
                    lse_err = max(lse_err, float((part[s, :, -1] - ref_lse[0]).abs().max()))
        worst = torch.tensor([o_err, lse_err, float(not finite), float(not empty_ok)])
        if pc.world_size > 1:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=pc.control_group)
        results.append((float(worst[0]), float(worst[1]), not worst[2], not worst[3]))
    return results


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
