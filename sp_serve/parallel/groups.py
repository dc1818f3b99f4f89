"""Process groups: one for tensors (NCCL on CUDA, gloo on CPU) and a gloo group for control,
and the communicator the attention algorithms use (parallel/comm.py).

The control group carries the pickled StepPlan that rank 0 broadcasts each step; keeping it
apart from the tensor group means a control message never queues behind a tensor transfer.
On CPU, ranks on one host exchange tensors through shared memory (parallel/shm.py) unless
`cpu_comm="gloo"`: a gloo message costs ~1.2 ms here, a shared-memory one ~25 us.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sp_serve.parallel.comm import Communicator, DistComm, SingleComm


@dataclass
class ParallelContext:
    """This rank's place in the TP x SP grid: global rank = sp_rank * tp_size + tp_rank, so a TP
    group is tp_size consecutive ranks (one node) and an SP group is the ranks with the same
    tp_rank, one per TP group. `comm` runs the attention's collectives along SP (the ring, the
    cached shards, the decode partials: each TP rank's ring carries only its own heads);
    `tp_comm` the all-reduces and vocabulary gathers of the sharded layers."""

    rank: int  # global
    world_size: int  # tp_size x sp_size
    device: torch.device
    control_group: dist.ProcessGroup | None  # gloo, every rank; None when world_size == 1
    backend: str
    comm: Communicator  # SP group (shm, gloo or NCCL)
    tp_size: int = 1
    tp_comm: Communicator | None = None  # TP group; None when tp_size == 1

    def __post_init__(self) -> None:
        if self.tp_comm is None:
            self.tp_comm = SingleComm()

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def sp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def sp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    )


def pick_device(device: str | None, local_rank: int) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if device != "cpu":
        raise ValueError(f"--device must be auto, cuda or cpu, got {device!r}")
    return torch.device("cpu")


def init_parallel(
    rank: int,
    world_size: int,
    store: dist.Store | None,
    dev: torch.device,
    timeout_s: float = 120.0,
    cpu_comm: str = "auto",
    tp_size: int = 1,
) -> ParallelContext:
    """Joins the process groups; store None means torchrun's env:// variables.

    tp_size: ranks per TP group (consecutive ranks); world_size // tp_size SP ranks.
    cpu_comm (CPU only): "auto" uses shared memory when every rank is on this host and the
    platform allows it, else gloo; "shm" insists; "gloo" always uses gloo."""
    if world_size % tp_size:
        raise ValueError(f"world size {world_size} is not a multiple of --tensor-parallel-size "
                         f"{tp_size}; launch tp x sp ranks")
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        # NCCL faults (see docs/architecture.md, "Faults"): on a timeout or a communicator
        # error torch's watchdog aborts the communicators and the error reaches the waiting
        # call (2, "CleanUpOnly"), which the engine turns into /health 503 and exit 1; the
        # default tears the whole process down from the watchdog thread, mid-call.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    rendezvous = {"init_method": "env://"} if store is None else {"store": store}
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        **rendezvous,
        **({"device_id": dev} if dev.type == "cuda" else {}),
    )
    control = dist.new_group(backend="gloo", timeout=timeout)
    sp_size = world_size // tp_size
    if tp_size == 1:
        comm = _communicator(rank, world_size, dev, control, None, timeout_s, cpu_comm)
        return ParallelContext(rank, world_size, dev, control, backend, comm)

    # Every rank creates every group, in the same order (torch.distributed's rule), and keeps
    # its own: a tensor group (NCCL on GPUs) and a gloo one (shared-memory setup) per dimension.
    def groups(member_lists: list[list[int]]) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        mine = None
        for ranks in member_lists:
            tensor_group = dist.new_group(ranks, timeout=timeout)
            gloo_group = dist.new_group(ranks, backend="gloo", timeout=timeout)
            if rank in ranks:
                mine = tensor_group, gloo_group
        return mine

    tp_groups = groups([[sp * tp_size + t for t in range(tp_size)] for sp in range(sp_size)])
    sp_groups = groups([[sp * tp_size + t for sp in range(sp_size)] for t in range(tp_size)])
    tp_comm = _communicator(rank % tp_size, tp_size, dev, tp_groups[1], tp_groups[0], timeout_s,
                            cpu_comm)
    comm = _communicator(rank // tp_size, sp_size, dev, sp_groups[1], sp_groups[0], timeout_s,
                         cpu_comm)
    return ParallelContext(rank, world_size, dev, control, backend, comm, tp_size, tp_comm)


def _communicator(rank: int, world_size: int, dev: torch.device, gloo_group: dist.ProcessGroup,
                  group: dist.ProcessGroup | None, timeout_s: float, cpu_comm: str
                  ) -> Communicator:
    """The collectives of one group: rank and world_size are this rank's place in it; group
    None is the default group, gloo_group a gloo group of the same ranks."""
    if world_size == 1:
        return SingleComm()
    if dev.type != "cpu" or cpu_comm == "gloo":
        return DistComm(rank, world_size, group)
    from sp_serve.parallel.shm import ShmComm, shm_supported
    # Every rank must take the same decision: agree on it over the gloo group.
    votes: list = [None] * world_size
    dist.all_gather_object(votes, (shm_supported(), socket.gethostname()), group=gloo_group)
    possible = all(ok for ok, _ in votes) and len({host for _, host in votes}) == 1
    if not possible:
        if cpu_comm == "shm":
            raise ValueError("--cpu-comm shm needs every rank on one x86-64 Linux host; use "
                             "--cpu-comm gloo (or auto)")
        return DistComm(rank, world_size, group)
    return ShmComm(rank, world_size, gloo_group, timeout_s)


def abort_parallel() -> bool:
    """Aborts every process group's communicators (NCCL: ncclCommAbort) without talking to
    the peers, so a collective blocked on a dead or stuck rank returns with an error instead of
    waiting out the timeout. Non-collective and safe from any thread; False if this torch has
    no such call or it failed (then the NCCL timeout, --dist-timeout, still ends the wait)."""
    if not dist.is_initialized():
        return False
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None:
        try:
            abort()  # every group, NCCL communicators inside one NCCL group call
            return True
        except Exception:  # e.g. a backend of this torch without abort: the NCCL one alone
            pass
    try:
        dist.group.WORLD._get_backend(torch.device("cuda")).abort()
        return True
    except Exception:  # already aborted, or no NCCL backend: nothing to undo
        return False


def shutdown_parallel(pc: ParallelContext | None = None, aborted: bool = False) -> None:
    """Leaves the process groups. aborted: a peer is gone, so the groups are aborted rather than
    destroyed (destroying an NCCL communicator waits for its peers)."""
    if pc is not None:
        pc.comm.close()
        pc.tp_comm.close()
    if aborted and pc is not None and pc.device.type == "cuda" and abort_parallel():
        return
    if dist.is_initialized():
        dist.destroy_process_group()
