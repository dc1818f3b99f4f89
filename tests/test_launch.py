"""launch/'s recipes: the torchrun line each builds (a stub torchrun on PATH prints it), the
TP x SP split of the world, and the refusal of a TP that does not divide it. No GPU needed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


@pytest.fixture
def stub_path(tmp_path) -> str:
    """A PATH whose torchrun prints its arguments (one a line) and whose nvidia-smi lists 8 GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (bin_dir / "nvidia-smi").write_text(
        '#!/usr/bin/env bash\nfor i in 0 1 2 3 4 5 6 7; do echo "GPU $i: H100"; done\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def _run(script: str, path: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("TP", "NGPUS", "MODEL")}
    return subprocess.run(["bash", str(LAUNCH / script), *args], check=False, capture_output=True,
                          text=True, env={**base, "PATH": path, **env}, timeout=60)


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_single_node_splits_the_gpus_into_tp_x_sp(stub_path):
    r = _run("single_node.sh", stub_path, MODEL="/ckpt", TP="4")
    assert r.returncode == 0, r.stderr
    argv = r.stdout.split("\n")
    assert argv[:4] == ["--standalone", "--nproc-per-node", "8", "-m"]  # nvidia-smi's 8 GPUs
    assert (_flag(argv, "--tensor-parallel-size"), _flag(argv, "--sp-size")) == ("4", "2")
    r = _run("single_node.sh", stub_path, "--max-num-seqs", "4", MODEL="/ckpt", NGPUS="4")
    argv = r.stdout.split("\n")
    assert (_flag(argv, "--tensor-parallel-size"), _flag(argv, "--sp-size")) == ("1", "4")
    assert _flag(argv, "--max-num-seqs") == "4"  # the rest passes through
    r = _run("single_node.sh", stub_path, MODEL="/ckpt", TP="3")
    assert r.returncode == 2 and "TP=3 must divide NGPUS=8" in r.stderr
    assert "TP x SP" in r.stderr and r.stdout == ""


def test_multi_node_keeps_tp_in_a_node_and_sp_across_nodes(stub_path):
    nodes = {"MODEL": "/ckpt", "MASTER_ADDR": "10.0.0.1", "NNODES": "2", "NODE_RANK": "1"}
    r = _run("multi_node.sh", stub_path, **nodes, NGPUS="8", TP="8")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    argv = r.stdout.split("\n")
    assert (_flag(argv, "--nnodes"), _flag(argv, "--node-rank"),
            _flag(argv, "--nproc-per-node")) == ("2", "1", "8")
    assert (_flag(argv, "--tensor-parallel-size"), _flag(argv, "--sp-size")) == ("8", "2")
    r = _run("multi_node.sh", stub_path, **nodes)  # TP 1: SP over all 16 GPUs
    argv = r.stdout.split("\n")
    assert (_flag(argv, "--tensor-parallel-size"), _flag(argv, "--sp-size")) == ("1", "16")
    r = _run("multi_node.sh", stub_path, **nodes, TP="16")  # allowed, but says what it costs
    assert r.returncode == 0 and "TP groups span nodes" in r.stderr
    r = _run("multi_node.sh", stub_path, **nodes, TP="3")
    assert r.returncode == 2 and "TP=3 must divide the world size" in r.stderr


@pytest.mark.parametrize("tp, sp", [(4, 2), (8, 2), (2, 8)])
def test_the_planners_recipe_runs_the_planned_layout(stub_path, tp, sp):
    """`sp-serve plan`'s recipe line, run as printed, starts tp x sp ranks with its flags."""
    import shlex

    from sp_serve.planner.analytic import MODEL_PRESETS, Deployment, plan
    from sp_serve.planner.hardware import get_hardware

    launch = plan(MODEL_PRESETS["llama-3.1-70b"], get_hardware("h100-sxm"),
                  Deployment(tp_size=tp, sp_size=sp, hbm_utilization=0.9), 4096,
                  model_path="/ckpt").launch
    words = shlex.split(launch["recipe"].replace("<node 0's address>", "10.0.0.1")
                        .replace(f"<0..{launch['num_nodes'] - 1}>", "0"))
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    script, rest = words[words.index("bash") + 1], words[words.index("bash") + 2:]
    r = _run(Path(script).name, stub_path, *rest, **env)
    assert r.returncode == 0, r.stderr
    argv = r.stdout.split("\n")
    assert _flag(argv, "--nproc-per-node") == str(launch["nproc_per_node"])
    assert argv[argv.index("serve") + 1:argv.index("serve") + 3] == ["--model", "/ckpt"]
    for flag, value in zip(launch["serve_flags"][::2], launch["serve_flags"][1::2]):
        assert _flag(argv, flag) == value
    # the torchrun line the plan prints asks for the same world
    printed = shlex.split(launch["command"])
    assert _flag(printed, "--nproc-per-node") == str(launch["nproc_per_node"])
    assert int(_flag(printed, "--tensor-parallel-size")) * int(_flag(printed, "--sp-size")) \
        == launch["world_size"] == tp * sp


def test_cpu_torchrun_passes_the_layout_of_its_ranks(stub_path):
    r = _run("cpu_torchrun.sh", stub_path, "4", "--prompt", "hi", TP="2")
    assert r.returncode == 0, r.stderr
    argv = r.stdout.split("\n")
    assert _flag(argv, "--nproc-per-node") == "4" and _flag(argv, "--prompt") == "hi"
    assert (_flag(argv, "--tensor-parallel-size"), _flag(argv, "--sp-size")) == ("2", "2")
    r = _run("cpu_torchrun.sh", stub_path, "3", TP="2")
    assert r.returncode == 2 and "TP=2 must divide the 3 ranks" in r.stderr
