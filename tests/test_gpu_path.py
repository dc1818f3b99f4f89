"""The CUDA path's hot-path rules, checked on the CPU (no GPU here; benchmarks/gpu_check.sh runs
the rest on one):

- the per-layer code makes no tensor from a Python list and reads nothing back to the host
  (each would be a host-device copy or sync per layer on CUDA); the step's metadata reaches
  the device in one copy (`worker.to_device`);
- decode reads the paged pool in place with the Triton kernel whatever the prefill backend
  (flash-attn included), and gives the per-sequence path's logits;
- the start-up warm-up runs every kernel variant serving reaches and leaves the pool as it was;
- kernel arguments that change from step to step are not specialized by Triton.
"""
from __future__ import annotations

import inspect
import os

import pytest
import torch

from sp_serve.engine.plan import DecodeToken, PrefillChunk, StepPlan
from sp_serve.engine.worker import Worker, to_device
from sp_serve.kv.cache import PagedKVCache
from sp_serve.model.loader import load_model
from sp_serve.parallel.comm import SingleComm
from sp_serve.parallel.groups import ParallelContext

interpret = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                               reason="Triton kernels on the CPU need TRITON_INTERPRET=1")


class _LayerSpy:
    """Wraps the model so that everything the worker's attention callable does (per layer)
    is watched for host-side tensor construction and device-to-host reads."""

    def __init__(self, model):
        self.model, self.in_layer, self.events = model, False, []

    def __call__(self, ids, pos, attn, rope_len, **kwargs):
        def watched(*args):
            self.in_layer = True
            try:
                return attn(*args)
            finally:
                self.in_layer = False
        return self.model(ids, pos, watched, rope_len, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _spy_on(monkeypatch, spy: _LayerSpy) -> None:
    def wrap(owner, name):
        original = getattr(owner, name)

        def watched(*args, **kwargs):
            if spy.in_layer:
                spy.events.append(name)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, watched)

    for name in ("tensor", "as_tensor", "from_numpy"):
        wrap(torch, name)
    for name in ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "nonzero"):
        wrap(torch.Tensor, name)


def _worker(model_dir, backend: str, num_blocks: int = 64, block_size: int = 4) -> Worker:
    model, spec = load_model(model_dir, dtype=torch.float32)
    kv = PagedKVCache(spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim,
                      torch.float32, torch.device("cpu"))
    pc = ParallelContext(0, 1, torch.device("cpu"), None, "gloo", SingleComm())
    return Worker(pc, model, spec, kv, backend)


def _steps(worker: Worker, prompts: list[list[int]], num_decode: int) -> list[dict]:
    """Two prompts, the second in two chunks (the cached-shard path), then decode steps of
    both at once; returns each step's logits."""
    (a, b), out = prompts, []
    out.append(worker.execute(StepPlan(prefill=[PrefillChunk(0, a, 0, True, len(a)),
                                                PrefillChunk(1, b[:7], 0, False, len(b))])))
    out.append(worker.execute(StepPlan(prefill=[PrefillChunk(1, b[7:], 7, True, len(b))])))
    tokens = {0: int(out[0][0].argmax()), 1: int(out[1][1].argmax())}
    for i in range(num_decode):
        plan = StepPlan(decode=[DecodeToken(0, tokens[0], len(a) + i, 0),
                                DecodeToken(1, tokens[1], len(b) + i, 0)])
        out.append(worker.execute(plan))
        tokens = {s: int(logits.argmax()) for s, logits in out[-1].items()}
    return out


PROMPTS = [list(range(5, 24)), list(range(40, 71))]


@pytest.mark.parametrize("backend,paged", [
    ("torch", False),
    pytest.param("flash-attn", True, marks=interpret),  # decode on the paged kernel, as on CUDA
    pytest.param("triton", True, marks=interpret),  # prefill on the Triton kernel too
])
def test_layers_make_no_tensor_from_a_list_and_never_read_back(tiny_model_dir, monkeypatch,
                                                               backend, paged):
    from sp_serve.attention.local import _cu_seqlens
    _cu_seqlens(1, torch.device("cpu"))  # the one-off per-device constant, made before serving
    worker = _worker(tiny_model_dir, backend)
    worker.paged_decode = paged
    spy = worker.model = _LayerSpy(worker.model)
    _spy_on(monkeypatch, spy)
    _steps(worker, PROMPTS, num_decode=2)
    assert spy.events == []


@interpret
def test_decode_reads_the_pool_in_place_whatever_the_prefill_backend(tiny_model_dir, monkeypatch):
    """flash-attn's prefill (its fp32 fallback here: flash-attn has no CPU build) with decode on
    the Triton paged kernel gives the per-sequence torch path's logits."""
    import sp_serve_kernels
    reference = _steps(_worker(tiny_model_dir, "torch"), PROMPTS, num_decode=3)
    worker = _worker(tiny_model_dir, "flash-attn")
    worker.paged_decode = True  # what paged_decode_supported says on CUDA with Triton
    calls = []
    original = sp_serve_kernels.paged_decode_attention

    def counted(*args, **kwargs):
        calls.append(args[3].shape)  # the block tables
        return original(*args, **kwargs)
    monkeypatch.setattr(sp_serve_kernels, "paged_decode_attention", counted)
    got = _steps(worker, PROMPTS, num_decode=3)
    assert len(calls) == 3 * worker.spec.num_layers  # one launch per decode step and layer
    for ref_step, step in zip(reference, got):
        assert ref_step.keys() == step.keys()
        for seq_id in ref_step:
            torch.testing.assert_close(step[seq_id], ref_step[seq_id], rtol=1e-4, atol=1e-4)


def test_paged_decode_is_chosen_on_cuda_whatever_the_prefill_backend(monkeypatch):
    import sp_serve_kernels
    from sp_serve.attention.sharded_cache import paged_decode_supported
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(sp_serve_kernels, "triton_available", lambda: True)
    assert all(paged_decode_supported(b, cuda) for b in ("flash-attn", "torch", "triton"))
    assert not paged_decode_supported("torch", cpu)
    monkeypatch.setattr(sp_serve_kernels, "triton_available", lambda: False)
    assert not paged_decode_supported("flash-attn", cuda)  # no Triton: the per-sequence path


def test_step_metadata_reaches_the_device_in_one_copy(monkeypatch):
    host = [torch.arange(5), torch.tensor([7, 8, 9]), torch.zeros(0, dtype=torch.long),
            torch.arange(6, dtype=torch.int32).view(2, 3), torch.tensor([3, 4], dtype=torch.int32)]
    assert to_device(host, torch.device("cpu")) is host  # CPU: no copy at all
    copies = []
    original = torch.Tensor.to

    def counted(self, *args, **kwargs):
        if self.device.type == "cpu":
            copies.append(args)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", counted)
    out = to_device(host, torch.device("meta"))  # a device other than the host
    assert len(copies) == 1
    assert [(t.shape, t.dtype, t.device.type) for t in out] == [
        (t.shape, t.dtype, "meta") for t in host]


def test_step_metadata_values_survive_the_packing(monkeypatch):
    """The packing itself (every piece at a 64-byte aligned offset), read back on the CPU."""
    host = [torch.arange(5), torch.tensor([7, 8, 9]), torch.arange(6, dtype=torch.int32).view(2, 3)]
    original = torch.Tensor.to
    flats = []

    def keep(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "meta":
            flats.append(self.clone())
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", keep)
    to_device(host, torch.device("meta"))
    (flat,) = flats
    assert flat[0:5].tolist() == [0, 1, 2, 3, 4] and flat[8:11].tolist() == [7, 8, 9]
    assert flat[16:22].tolist() == list(range(6))


@interpret
def test_warm_up_runs_every_variant_and_leaves_the_pool_free(tiny_model_dir):
    worker = _worker(tiny_model_dir, "triton", num_blocks=32, block_size=16)
    worker.paged_decode = True
    free = worker.kv.num_free_blocks
    launches = worker.warm_up(max_batch=2, long_context=160)
    assert launches == 4 + 2 * 2  # 4 prefill blocks; 2 batch sizes x (one split, several)
    assert worker.kv.num_free_blocks == free and worker.kv.num_tokens(-(1 << 40)) == 0
    assert _worker(tiny_model_dir, "torch").warm_up(max_batch=2) == 0  # CPU torch: no Triton


def test_step_dependent_kernel_arguments_are_not_specialized():
    import importlib
    kernels = {
        "decode_attention._decode_split_kernel": {"num_splits", "stride_tables_b", "stride_ob"},
        "prefill_attention._prefill_kernel": {"num_m_blocks", "stride_lh", "stride_lt"},
        "lse_merge._merge_kernel": {"num_parts", "stride_op", "stride_ot", "stride_lt"},
    }
    for path, varying in kernels.items():
        module, name = path.split(".")
        kernel = getattr(importlib.import_module(f"sp_serve_kernels.{module}"), name)
        options = getattr(kernel, "kwargs", None) or {"do_not_specialize": kernel.do_not_specialize}
        names = set(options["do_not_specialize"])
        assert varying <= names, (path, varying - names)
        assert names <= set(inspect.signature(kernel.fn).parameters), path  # no typo


def test_fp32_on_cuda_uses_an_sdpa_op_that_has_fp32(monkeypatch):
    """torch's flash SDPA op has no fp32 CUDA kernel: fp32 goes to the memory-efficient op,
    whose lse comes padded along the queries (to 32 on the meta device, as on some GPUs) and is
    cut to length. The meta device stands in for CUDA: shapes and dispatch, no numbers."""
    from sp_serve.attention.local import _flash

    def no_flash(*args, **kwargs):
        raise AssertionError("the flash SDPA op was called for fp32")
    q = torch.empty(1, 4, 5, 16, device="meta")
    k = torch.empty(1, 4, 7, 16, device="meta")
    with monkeypatch.context() as m:
        m.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", no_flash)
        o, lse = _flash(q, k, k, False, 0.25)
    assert o.shape == (1, 4, 5, 16) and lse.shape == (1, 4, 5) and lse.dtype == torch.float32
    o, lse = _flash(q.half(), k.half(), k.half(), False, 0.25)  # fp16: the flash op
    assert o.shape == (1, 4, 5, 16) and lse.shape == (1, 4, 5)


def test_steps_and_calibration_are_timed_after_a_device_sync(monkeypatch):
    """On CUDA a step's kernels run after execute() returns: the clock must stop after a
    synchronize, not at the launch."""
    import time as time_module
    from types import SimpleNamespace

    from sp_serve.engine import engine as engine_module
    from sp_serve.kv.block_manager import BlockManager

    order = []
    eng = engine_module.LLMEngine.__new__(engine_module.LLMEngine)
    worker = SimpleNamespace(execute=lambda plan: order.append("execute") or {})
    eng.runtime = SimpleNamespace(pc=SimpleNamespace(device=torch.device("cuda", 0)),
                                  send_plan=lambda plan: None, worker=worker)
    eng.world_size = eng.sp_size = eng.tp_size = 1
    eng._procs = []
    eng.blocks = BlockManager(1, 64, 16)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: order.append("sync"))
    clock = time_module.perf_counter
    monkeypatch.setattr(engine_module.time, "perf_counter",
                        lambda: order.append("clock") or clock())
    samples = []
    assert eng._profile_step([(-5, 0, 8)], [], {}, samples)
    assert order == ["clock", "execute", "sync", "clock"] and len(samples) == 1
    eng.runtime.pc.device = torch.device("cpu")
    order.clear()
    eng._profile_step([(-6, 0, 8)], [], {}, samples)
    assert order == ["clock", "execute", "clock"]  # CPU: nothing to wait for


def test_profile_forward_runs_on_the_model(tiny_model_dir, monkeypatch):
    """The profiling forward is a real forward pass (here on the CPU, where it measures 0)."""
    from sp_serve.engine.runtime import profile_peak_bytes
    model, spec = load_model(tiny_model_dir, dtype=torch.float32)
    seen = []
    original = model.forward

    def counted(ids, pos, attn, rope_len=None):
        seen.append(ids.shape[0])
        return original(ids, pos, attn, rope_len)
    monkeypatch.setattr(model, "forward", counted)
    assert profile_peak_bytes(model, spec, 300, 8, "torch", torch.device("cpu")) == 0
    assert seen == [300]


def test_cuda_kv_pool_is_sized_after_a_profiling_forward(monkeypatch):
    """The KV budget on a GPU: what --gpu-memory-utilization allows, less the weights, the
    profiled peak of the largest step this rank may run and the memory outside torch's
    allocator; no fixed reserve. The CUDA memory API is faked (no GPU here)."""
    from types import SimpleNamespace

    from sp_serve.config import EngineConfig
    from sp_serve.engine import runtime
    gib = 2**30
    profiled = []

    def fake_profile(model, spec, tokens, logits, backend, device):
        profiled.append((tokens, logits, backend))
        return int(3.5 * gib)
    monkeypatch.setattr(runtime, "profile_peak_bytes", fake_profile)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (60 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 16 * gib)  # weights
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 18 * gib)
    config = EngineConfig(model="unused", max_num_batched_tokens=8192, max_num_seqs=64,
                          gpu_memory_utilization=0.9)
    pc = SimpleNamespace(device=torch.device("cuda", 0), world_size=2, sp_size=2)
    budget = runtime.cuda_kv_budget(config, None, None, pc, "triton")
    assert profiled == [(4096 + 64, 64, "triton")]  # this rank's share of the largest chunk
    # 72 GiB allowed - 16 weights - 3.5 profiled peak - 2 outside torch (20 used, 18 reserved)
    assert budget == int(72 * gib) - 16 * gib - int(3.5 * gib) - 2 * gib


def test_a_dead_rank_on_cuda_aborts_the_communicators_at_once(monkeypatch):
    """NCCL does not notice a dead peer until its timeout: rank 0 watches its spawned ranks and
    aborts the communicators when one exits, so the blocked collective fails and the engine is
    dead (/health 503, exit 1) at once. Faked here: no NCCL on this machine."""
    from types import SimpleNamespace

    from sp_serve.engine import engine as engine_module
    aborts = []
    monkeypatch.setattr(engine_module, "abort_parallel", lambda: aborts.append(1) or True)
    eng = engine_module.LLMEngine.__new__(engine_module.LLMEngine)
    import threading
    eng._stopping, eng.dead = threading.Event(), False
    eng._procs = [SimpleNamespace(exitcode=None), SimpleNamespace(exitcode=None)]
    assert not eng._check_ranks() and not aborts and not eng.dead
    eng._procs[1].exitcode = 1  # rank 2 ran out of memory and exited
    assert eng._check_ranks() and aborts == [1] and eng.dead
    eng._stopping.set()  # a normal shutdown: ranks exiting then are no fault
    eng.dead, aborts[:] = False, []
    assert not eng._check_ranks() and not aborts and not eng.dead


def test_nccl_errors_reach_the_waiting_call_instead_of_killing_the_process(monkeypatch):
    """On CUDA, TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (abort the communicators, raise in the caller)
    is set before the process group starts, unless the user chose a value."""
    from sp_serve.parallel import groups
    seen = []

    def fake_init(**kwargs):
        seen.append(os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"))
        raise RuntimeError("stop here")
    monkeypatch.setattr(groups.dist, "init_process_group", fake_init)
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    with pytest.raises(RuntimeError, match="stop here"):
        groups.init_parallel(0, 1, None, torch.device("cuda", 0))
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    with pytest.raises(RuntimeError, match="stop here"):
        groups.init_parallel(0, 1, None, torch.device("cuda", 0))
    assert seen == ["2", "1"]
    assert groups.abort_parallel() is False  # nothing initialised: nothing to abort


def test_dynamic_rope_lengths_come_from_the_host(hf_checkpoint, monkeypatch):
    """Dynamic-NTK RoPE needs the step's distinct sequence lengths: the worker hands them over
    from its host metadata, so the model does not read them back from the device (a sync per
    step on CUDA). The numbers are test_sp_vs_hf's (the llama-dynamic-scaling case)."""
    from sp_serve.model.rope import RotaryEmbedding
    worker = _worker(hf_checkpoint("llama-dynamic-scaling"), "torch", num_blocks=256)
    assert worker.model.rope.rope_type == "dynamic"
    seen = []
    original = RotaryEmbedding._inv_freq

    def recording(self, positions_t, rope_len_t, lengths=None):
        seen.append(lengths)
        return original(self, positions_t, rope_len_t, lengths)
    monkeypatch.setattr(RotaryEmbedding, "_inv_freq", recording)
    _steps(worker, [list(range(5, 300)), list(range(40, 71))], num_decode=1)
    assert seen == [[31, 295], [31], [32, 296]]  # decode: position + 1
