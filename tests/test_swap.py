"""Swap to host through the real engine (`LLM`, real rank processes): sequences preempted by a
swap give exactly the greedy tokens they give when each runs alone with nothing preempted, at
SP 1 and 2, with prefix caching on and off, with a host pool too small for any victim
(recompute takes over; a pool that takes some victims and not others is in test_scheduler.py),
and with requests aborted while swapped out; afterwards every device and host block is free on
the engine's mirror of every rank and on rank 0's pool. The block-level properties (the ranks'
mirror of every swap, exact counts after random operations) are in test_scheduler.py.

The cache's copies on a CUDA side stream: their ordering against the compute stream is checked
on the CPU through a fake stream (`FakeStreams`) and a dispatch mode that sees every op on the
pools (`StreamRules`); the real stream has a CUDA-only test, skipped here (no GPU on this
machine).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sp_serve.engine.sampling import SamplingParams
from tests.checkpoints import CHECKPOINT_CASES, write_hf_checkpoint

PER_BLOCK = 2 * 2 * 2 * 16 * 4 * 16  # layers x (k, v) x kv heads x head_dim x fp32 x block 16
ENGINE = dict(scheduler="fcfs", max_num_batched_tokens=128, cpu_threads=1, dist_timeout_s=60,
              kv_cache_memory=40 * PER_BLOCK)
NEW = 100


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cases = dict(CHECKPOINT_CASES)
    return str(write_hf_checkpoint(tmp_path_factory.mktemp("swap") / "m", **cases["llama-gqa"]))


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _assert_all_free(llm, host_blocks: int) -> None:
    engine = llm.engine
    blocks = engine.blocks
    blocks.evict_all()
    engine.heartbeat()  # the frees reach the ranks
    world, num_blocks = engine.sp_size, engine.runtime.num_blocks
    assert blocks.free_blocks == [num_blocks] * world and not blocks.tokens
    assert not blocks.swapped and [p.num_free_blocks for p in blocks.host_pools] == \
        [host_blocks] * world
    kv = engine.runtime.worker.kv
    assert kv.num_free_blocks == num_blocks and kv.host_pool.num_free_blocks == host_blocks
    assert not kv.pool.holders() and not kv.host_pool.holders()


@pytest.mark.parametrize("sp,prefix_caching,host_blocks", [(1, False, 200), (2, True, 200),
                                                           (2, False, 4)])
def test_swapped_sequences_give_the_tokens_of_an_unpreempted_run(ckpt, sp, prefix_caching,
                                                                   host_blocks):
    from sp_serve import LLM
    prompts = [_tokens(230 + 7 * i, 30 + i) for i in range(5)]
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    with LLM(ckpt, sp_size=sp, enable_prefix_caching=prefix_caching,
             kv_offloading_size=host_blocks * PER_BLOCK, preemption_mode="swap", **ENGINE) as llm:
        assert llm.engine.runtime.num_blocks == 40 and llm.engine.runtime.host_blocks == host_blocks
        alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
        assert llm.engine.scheduler.num_preemptions == 0
        together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        blocks = llm.engine.blocks
        assert llm.engine.scheduler.num_preemptions > 0
        assert blocks.num_swapped_in == blocks.num_swapped_out
        assert blocks.swapped_out_blocks == blocks.swapped_in_blocks
        if host_blocks > 40:
            assert blocks.num_swapped_out > 0
        else:  # no victim's shard fits the host pool: every one is recomputed
            assert blocks.num_swapped_out == 0
        assert together == alone
        _assert_all_free(llm, host_blocks)


def test_aborts_while_swapped_out_free_the_host_blocks(ckpt):
    """Requests aborted while their KV is on the host: their host blocks are freed (on the
    engine and the ranks) and the others still give their unpreempted tokens."""
    from sp_serve import LLM
    prompts = [_tokens(240, 50 + i) for i in range(5)]
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    with LLM(ckpt, sp_size=2, kv_offloading_size=200 * PER_BLOCK, **ENGINE) as llm:
        assert llm.engine.config.preemption_mode == "swap"  # the default with a host pool
        alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
        engine = llm.engine
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        aborted = set()
        while engine.has_unfinished():
            for event in engine.step():
                if event.sample is not None:
                    outputs[event.seq.request_id].append(event.sample.token_id)
            for seq in list(engine.scheduler.swapped):
                if len(aborted) < 2 and seq.request_id not in aborted:
                    aborted.add(seq.request_id)
                    engine.abort_request(seq.request_id)
        assert aborted  # at least one request was aborted while swapped out
        for i in range(len(prompts)):
            if f"r{i}" not in aborted:
                assert outputs[f"r{i}"] == alone[i]
        _assert_all_free(llm, 200)


def test_swap_flags_and_their_errors():
    from sp_serve.cli import build_parser, engine_config
    from sp_serve.config import EngineConfig
    with pytest.raises(ValueError, match="--preemption-mode swap needs a host pool"):
        EngineConfig(model="m", preemption_mode="swap")
    assert EngineConfig(model="m", kv_offloading_size=1).preemption_mode == "swap"
    assert EngineConfig(model="m").preemption_mode == "recompute"
    args = build_parser().parse_args(["generate", "--model", "m", "--swap-space", "1.5",
                                      "--preemption-mode", "recompute", "--prompt", "x"])
    config = engine_config(args)
    assert config.kv_offloading_size == int(1.5 * 2**30)
    assert config.preemption_mode == "recompute"


# ---- the cache's copies on a side stream (CUDA), played on the CPU by a fake stream ------------
class FakeStreams:
    """`SwapStreams` on the CPU: the copies run at once, but it keeps what a CUDA side stream
    would owe: the side-stream events the compute stream has not waited for (copies in flight)
    and whether the side stream waited for the compute stream since it last touched the pool."""

    def __init__(self):
        self.on = "compute"
        self.in_flight: set[int] = set()
        self.side_saw_compute = True
        self.events = 0

    def side_waits_for_compute(self):
        self.side_saw_compute = True

    @contextlib.contextmanager
    def on_side(self):
        self.on = "side"
        try:
            yield
        finally:
            self.on = "compute"

    def record(self):
        self.events += 1
        self.in_flight.add(self.events)
        return self.events

    def compute_waits_for(self, event):  # one stream runs in order: the earlier ones are done too
        self.in_flight = {e for e in self.in_flight if e > event}


class StreamRules(TorchDispatchMode):
    """Checks every tensor op that touches the cache's device pool or host pool: on the compute
    stream, none while a side-stream copy is in flight; on the side stream, none before it
    waited for the compute stream's last access; the host pool, on the side stream only."""

    def __init__(self, kv, streams: FakeStreams):
        super().__init__()
        self.streams = streams
        self.device = {t.untyped_storage().data_ptr() for t in kv._tensors()}
        self.host = {t.untyped_storage().data_ptr() for t in kv._host}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ptrs = {a.untyped_storage().data_ptr() for a in pytree.tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor)}
        s = self.streams
        if ptrs & self.device:
            if s.on == "compute":
                assert not s.in_flight, f"{func} on the pool while a swap copy is in flight"
                s.side_saw_compute = False
            else:
                assert s.side_saw_compute, \
                    f"side-stream {func} before waiting for the compute stream"
        if ptrs & self.host:
            assert s.on == "side", f"{func} on the host pool off the side stream"
        return func(*args, **kwargs)


def _filled(kv, seq_id: int, n: int, seed: int) -> torch.Tensor:
    """Appends n tokens to the sequence's shard (a prompt chunk) and writes random K = V."""
    x = torch.randn(n, 2, 8, generator=torch.Generator().manual_seed(seed))
    kv.write(0, kv.append_slots(seq_id, n), x, x)
    kv.write(1, kv.slots(seq_id, kv.num_tokens(seq_id) - n), 2 * x, 2 * x)
    return x


def _read(kv, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return kv.read(0, kv.slots(seq_id))[0], kv.read(1, kv.slots(seq_id))[0]


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "fp8"])
def test_swap_copies_on_a_side_stream_keep_their_order(kv_dtype):
    """With a side stream (played by FakeStreams), a step's swap-outs and swap-ins, a share's
    block copy into a block a swap-out freed, and the step's appends and writes after them,
    each reusing freed device and host blocks: no op breaks the stream rules (`StreamRules`),
    and every shard reads back as written."""
    from sp_serve.kv.cache import PagedKVCache
    streams = FakeStreams()
    kv = PagedKVCache(2, 12, 4, 2, 8, torch.float32, torch.device("cpu"), kv_dtype,
                      host_blocks=10, swap_streams=streams)
    for sid, n in ((0, 9), (1, 6), (2, 7)):  # blocks 0-2, 3-4, 5-6
        _filled(kv, sid, n, sid)
    want = {sid: _read(kv, sid) for sid in (0, 1, 2)}
    got = {}
    with StreamRules(kv, streams):
        # step 1: 0 and 2 out (host blocks 0-2, 3-4); the step's prompt 3 takes 0's blocks
        kv.apply([("swap_out", 0), ("swap_out", 2)], 0)
        _filled(kv, 3, 13, 3)
        # step 2: 0 back (host 0-2 freed); 1 out into host 0-1, which 0's copy in read; a new
        # sequence shares 3's first 6 tokens: its copy of the partial block goes into device
        # block 3, which 1's swap-out freed; then the step's write
        kv.apply([("swap_in", 0), ("swap_out", 1), ("share", 4, 3, [6])], 0)
        assert kv.pool.table(4) == [0, 3] and kv.host_pool.table(1) == [0, 1]
        _filled(kv, 4, 1, 4)
        want[3] = _read(kv, 3)
        # step 3: 3 out into host blocks 2 and 5-7 (two runs); 1 back into 3's device blocks
        kv.apply([("free", 4), ("swap_out", 3), ("swap_in", 1), ("swap_in", 2)], 0)
        assert kv.host_pool.table(3) == [2, 5, 6, 7] and kv.pool.table(1) == [0, 1]
        got.update({sid: _read(kv, sid) for sid in (0, 1, 2)})
        kv.apply([("free", 0), ("free", 1), ("swap_in", 3)], 0)
        got[3] = _read(kv, 3)
    assert streams.events == 8 and not streams.in_flight
    for sid, (k0, k1) in want.items():
        assert torch.equal(got[sid][0], k0) and torch.equal(got[sid][1], k1), sid
    kv.apply([("free", 2), ("free", 3)], 0)
    assert kv.num_free_blocks == 12 and kv.host_pool.num_free_blocks == 10


def test_stream_rules_catch_a_write_during_a_copy_and_a_copy_before_the_compute_stream():
    """The checker itself: a write while a swap copy is in flight, and a side-stream copy that
    did not wait for the compute stream's last write, both fail."""
    from sp_serve.kv.cache import PagedKVCache
    streams = FakeStreams()
    kv = PagedKVCache(2, 8, 4, 2, 8, torch.float32, torch.device("cpu"), host_blocks=4,
                      swap_streams=streams)
    _filled(kv, 0, 5, 0)
    with StreamRules(kv, streams):
        streams.record()  # a copy in flight the compute stream has not waited for
        with pytest.raises(AssertionError, match="in flight"):
            _filled(kv, 1, 3, 1)
        streams.in_flight.clear()
        _filled(kv, 1, 3, 1)
        streams.side_waits_for_compute = lambda: None  # a side stream that does not wait
        with pytest.raises(AssertionError, match="before waiting"):
            kv.apply([("swap_out", 0)], 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none on the CI machine)")
def test_swap_round_trip_on_cuda_behind_queued_compute_work():
    """The real side stream: shards written behind long kernels queued on the compute stream
    are swapped out (each step's new prompt writing into the blocks freed) and back, and read
    back as written; the host pool is pinned."""
    from sp_serve.kv.cache import PagedKVCache
    dev = torch.device("cuda")
    kv = PagedKVCache(2, 128, 16, 2, 64, torch.float16, dev, host_blocks=64)
    assert kv._streams is not None and all(h.is_pinned() for h in kv._host)
    big = torch.randn(4096, 4096, device=dev)
    want = {}
    for sid in range(4):
        for _ in range(4):
            big = torch.tanh(big @ big)  # keeps the compute stream busy ahead of the host
        x = torch.randn(200, 2, 64, device=dev).half()
        kv.write(0, kv.append_slots(sid, 200), x, x)
        kv.write(1, kv.slots(sid), -x, -x)
        want[sid] = x
        kv.apply([("swap_out", sid)], 0)
        kv.write(0, kv.append_slots(100 + sid, 200), x * 0, x * 0)  # into the freed blocks
        assert kv.pool.table(100 + sid) == list(range(13 * sid, 13 * sid + 13))
    kv.apply([("swap_in", sid) for sid in range(4)], 0)
    for sid, x in want.items():
        assert torch.equal(kv.read(0, kv.slots(sid))[0], x)
        assert torch.equal(kv.read(1, kv.slots(sid))[0], -x)
