"""How to start the engine a plan describes: `sp-serve serve`'s flags and the torchrun line.

A plan's layout is tp x sp ranks, one per GPU: a TP group of tp consecutive ranks per SP rank
(global rank = sp_rank x tp + tp_rank), so with tp dividing the GPUs of a node every TP group
stays on one node (its all-reduces on NVLink) and the SP ring crosses nodes. torchrun starts
gpus_per_node ranks per node, so the world size (tp x sp) must equal nnodes x nproc_per_node;
the recipes in launch/ compute SP from it and TP.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field

from sp_serve.planner.analytic import Deployment

MASTER_PORT = 29500  # launch/multi_node.sh's default


@dataclass(frozen=True)
class Launch:
    tp_size: int
    sp_size: int
    world_size: int  # tp x sp GPUs, one rank each
    num_nodes: int
    nproc_per_node: int  # torchrun's --nproc-per-node (GPUs used per node)
    serve_flags: list[str]  # what `sp-serve serve` needs beyond --model
    command: str  # the torchrun line (every node runs it, with its own NODE_RANK)
    recipe: str  # the same through a launch/ script
    notes: list[str] = field(default_factory=list)

    @property
    def flags(self) -> str:
        return shlex.join(self.serve_flags)

    def to_dict(self) -> dict:
        return {**asdict(self), "flags": self.flags}


def serve_flags(dep: Deployment) -> tuple[list[str], list[str]]:
    """(flags, notes): `sp-serve serve`'s flags for the deployment, and what has none."""
    flags = ["--tensor-parallel-size", str(dep.tp_size), "--sp-size", str(dep.sp_size)]
    notes = []
    if dep.kv_dtype in ("fp8", "int8"):
        flags += ["--kv-cache-dtype", dep.kv_dtype]
    elif dep.kv_dtype != dep.weight_dtype:
        notes.append(f"the engine keeps an unquantized KV cache in the model's dtype: the "
                     f"plan's {dep.kv_dtype} KV has no flag of its own")
    if dep.weight_dtype in ("fp16", "fp32"):
        flags += ["--dtype", {"fp16": "float16", "fp32": "float32"}[dep.weight_dtype]]
    elif dep.weight_dtype != "bf16":
        notes.append(f"the engine serves bf16, fp16 or fp32 weights: the plan's "
                     f"{dep.weight_dtype} weights have no flag")
    if dep.hbm_utilization < 1:
        flags += ["--gpu-memory-utilization", f"{dep.hbm_utilization:g}"]
    else:
        notes.append("the plan gives weights + KV the whole HBM (--hbm-utilization 1.0); the "
                     "engine reserves room for activations (--gpu-memory-utilization 0.9 by "
                     "default), so it holds less KV than planned")
    return flags, notes


def launch_for(dep: Deployment, model: str | None = None) -> Launch:
    """The launch of dep's layout; model: the checkpoint path (None: "$MODEL")."""
    flags, notes = serve_flags(dep)
    world, nodes = dep.world_size, dep.num_nodes
    per_node = world // nodes
    model_arg = shlex.quote(model) if model else '"$MODEL"'
    serve = f"sp_serve.cli serve --model {model_arg} {shlex.join(flags)}"
    env_model = f"MODEL={model_arg} " if model else ""  # else MODEL from the environment
    tp_env = "" if dep.tp_size == 1 else f" TP={dep.tp_size}"
    # the recipes derive --tensor-parallel-size and --sp-size from TP and the world; the rest
    # of the flags follow the script
    rest = "".join(" " + shlex.quote(f) for f in flags[4:])
    if nodes == 1:
        command = f"torchrun --standalone --nproc-per-node {world} -m {serve}"
        recipe = f"{env_model}NGPUS={world}{tp_env} bash launch/single_node.sh{rest}"
        if world < dep.gpus_per_node:
            notes.append(f"uses {world} of the node's {dep.gpus_per_node} GPUs "
                         "(CUDA_VISIBLE_DEVICES picks which)")
    else:
        command = (f"torchrun --nnodes {nodes} --node-rank $NODE_RANK --nproc-per-node {per_node} "
                   f"--master-addr $MASTER_ADDR --master-port {MASTER_PORT} -m {serve}")
        recipe = (f"{env_model}MASTER_ADDR=<node 0's address> NNODES={nodes} "
                  f"NODE_RANK=<0..{nodes - 1}> NGPUS={per_node}{tp_env} "
                  f"bash launch/multi_node.sh{rest}")
        notes.append(f"run it on each of the {nodes} nodes with its NODE_RANK; rank 0 (node 0) "
                     "serves HTTP")
        if dep.tp_spans_nodes:
            notes.append(f"a TP group of {dep.tp_size} spans nodes of {dep.gpus_per_node} GPUs: "
                         "its two all-reduces per layer cross the network; a tp dividing "
                         f"{dep.gpus_per_node} keeps them on NVLink")
    if model is None:
        notes.append("set MODEL to the checkpoint directory (or .gguf file) to serve")
    return Launch(
        tp_size=dep.tp_size,
        sp_size=dep.sp_size,
        world_size=world,
        num_nodes=nodes,
        nproc_per_node=per_node,
        serve_flags=flags,
        command=command,
        recipe=recipe,
        notes=notes,
    )
