"""Swap to host through the real engine (`LLM`, real rank processes): sequences preempted by a
swap give exactly the greedy tokens they give when each runs alone with nothing preempted, at
SP 1 and 2, with prefix caching on and off, with a host pool too small for any victim
(recompute takes over; a pool that takes some victims and not others is in test_scheduler.py),
and with requests aborted while swapped out; afterwards every device and host block is free on
the engine's mirror of every rank and on rank 0's pool. The block-level properties (the ranks'
mirror of every swap, exact counts after random operations) are in test_scheduler.py.
"""
from __future__ import annotations

import pytest
import torch

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
