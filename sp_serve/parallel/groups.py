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
    rank: int
    world_size: int
    device: torch.device
    control_group: dist.ProcessGroup | None  # gloo; None when world_size == 1 and no init
    backend: str
    comm: Communicator  # the tensor collectives (shm, gloo or NCCL)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world_size


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
) -> ParallelContext:
    """Joins the process groups; store None means torchrun's env:// variables.

    cpu_comm (CPU only): "auto" uses shared memory when every rank is on this host and the
    platform allows it, else gloo; "shm" insists; "gloo" always uses gloo."""
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        # NCCL faults (see docs/architecture.md, "Faults"): on a timeout or a communicator
        # error torch's watchdog aborts the communicators and the error reaches the waiting
        # call (2, "CleanUpOnly"), which the engine turns into /health 503 and exit 1; the
        # default tears the whole process down from the watchdog thread, mid-call.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    rendezvous = {"init_method": "env://"} if store is None else {"store": store}
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **rendezvous,
        **({"device_id": dev} if dev.type == "cuda" else {}),
    )
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    comm = _communicator(rank, world_size, dev, control, timeout_s, cpu_comm)
    return ParallelContext(rank, world_size, dev, control, backend, comm)


def _communicator(rank: int, world_size: int, dev: torch.device, control: dist.ProcessGroup,
                  timeout_s: float, cpu_comm: str) -> Communicator:
    if world_size == 1:
        return SingleComm()
    if dev.type != "cpu" or cpu_comm == "gloo":
        return DistComm(rank, world_size)
    from sp_serve.parallel.shm import ShmComm, shm_supported
    # Every rank must take the same decision: agree on it over the control group.
    votes: list = [None] * world_size
    dist.all_gather_object(votes, (shm_supported(), socket.gethostname()), group=control)
    possible = all(ok for ok, _ in votes) and len({host for _, host in votes}) == 1
    if not possible:
        if cpu_comm == "shm":
            raise ValueError("--cpu-comm shm needs every rank on one x86-64 Linux host; use "
                             "--cpu-comm gloo (or auto)")
        return DistComm(rank, world_size)
    return ShmComm(rank, world_size, control, timeout_s)


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
    if aborted and pc is not None and pc.device.type == "cuda" and abort_parallel():
        return
    if dist.is_initialized():
        dist.destroy_process_group()
