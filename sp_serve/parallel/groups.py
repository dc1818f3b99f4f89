"""Process groups: one for tensors (NCCL on CUDA, gloo on CPU) and a gloo group for control.

The control group carries the pickled StepPlan that rank 0 broadcasts each step; keeping it
apart from the tensor group means a control message never queues behind a tensor transfer.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    device: torch.device
    control_group: dist.ProcessGroup | None  # gloo; None when world_size == 1 and no init
    backend: str

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
) -> ParallelContext:
    """Joins the process groups; store None means torchrun's env:// variables."""
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
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
    return ParallelContext(rank, world_size, dev, control, backend)


def shutdown_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
