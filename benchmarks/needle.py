"""Needle in a haystack: pass-key retrieval on the real default model, SmolLM2-135M-Instruct
(trained to 8K tokens), over prompt lengths x needle depths x SP sizes, native up to 8K and past
it with a RoPE override (yarn x2: 16K); for a subset of cells, sp-serve's greedy tokens against
Hugging Face transformers run on the same checkpoint with the same overridden config.

    python benchmarks/needle.py [--out-dir results/needle] [--resume]
        [--kv-cache-dtypes auto int8 fp8 fp8_e5m2]

Writes needle.json (every cell: prompt tokens, key, answer, found, seconds; HF's tokens for the
--hf-cells) and needle.png (found / not found, length by depth, one panel per SP size and KV
dtype). With several --kv-cache-dtypes, each quantized cell also records how its first output
token's logits differ from the unquantized cache's (auto, run first): KL(auto || quantized) of
the next-token distribution, the largest absolute logit difference, and whether its greedy
tokens equal auto's. Each
SP size runs on one set of ranks, one torch thread per rank; the fcfs scheduler with a step
budget that holds the longest prompt, so every prompt is one prefill step. It measures and
prints; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sp_serve import LLM, SamplingParams
from sp_serve.config import parse_bytes
from sp_serve.bench.passkey import found_key, passkey_prompt, random_key
from sp_serve.model.gguf import gguf_checkpoint
from sp_serve.model.loader import load_tokenizer
from sp_serve.model.source import default_model
from sp_serve.model.spec import load_hf_config

YARN_X2 = {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192},
           "max_position_embeddings": 16384}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint dir or .gguf (default: the default model)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000],
                   help="native prompt lengths (tokens; the answer must fit in 8192 too)")
    p.add_argument("--long-lengths", type=int, nargs="*", default=[16000],
                   help="prompt lengths served with --long-overrides")
    p.add_argument("--long-overrides", type=json.loads, default=YARN_X2)
    p.add_argument("--long-sp", type=int, nargs="*", default=None,
                   help="SP sizes for the long lengths (default: --sp)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--hf-cells", nargs="*", default=["2048:0.5", "8000:0.5", "16000:0.5"],
                   help="LENGTH:DEPTH cells whose greedy tokens are compared with transformers")
    p.add_argument("--hf-threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"],
                   help="KV cache dtypes to run every cell with (auto first: the reference)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV pool per rank (default: the engine's); the capacity in tokens per "
                   "rank of each KV dtype is recorded")
    p.add_argument("--out-dir", type=Path, default=Path("results/needle"))
    p.add_argument("--resume", action="store_true", help="keep the cells already in needle.json")
    return p.parse_args()


def _cell_key(sp: int | str, n: int, depth: float, rope: str, kv: str = "auto") -> str:
    return f"sp{sp}/{n}/{depth:g}/{rope}" + ("" if kv == "auto" else f"/{kv}")


def _key_for(n: int, depth: float) -> int:
    return random_key(n * 1000 + round(depth * 100))  # the same prompt at every SP size


_REFERENCE_LOGITS: dict[str, torch.Tensor] = {}  # auto cells' first-token logits, this run


def _capture_first_logits(llm) -> dict[int, torch.Tensor]:
    """{seq_id: the logits its first output token was sampled from}, filled as the engine runs
    (rank 0's worker returns each step's logits to the engine)."""
    worker, first = llm.engine.runtime.worker, {}
    execute = worker.execute

    def capture(plan):
        out = execute(plan)
        for seq_id, logits in out.items():
            first.setdefault(seq_id, logits.detach().float().cpu().clone())
        return out

    worker.execute = capture
    return first


def run_cells(ckpt: Path, sp: int, lengths: list[int], depths: list[float], rope: str,
              overrides: dict | None, args, results: dict, save, kv: str = "auto") -> None:
    todo = [(n, d) for n in lengths for d in depths
            if _cell_key(sp, n, d, rope, kv) not in results["cells"]]
    if not todo:
        return
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    with LLM(str(ckpt), sp_size=sp, scheduler="fcfs", max_num_batched_tokens=max(lengths) + 64,
             cpu_threads=1, hf_overrides=overrides, kv_cache_dtype=kv,
             kv_cache_memory=args.kv_cache_memory) as llm:
        first = _capture_first_logits(llm)
        results.setdefault("kv_capacity_tokens_per_rank", {})[kv] = \
            llm.engine.kv_capacity_tokens // llm.engine.sp_size
        for n, depth in todo:
            key = _key_for(n, depth)
            ids = passkey_prompt(llm.tokenizer, n, depth, key)
            t0 = time.perf_counter()
            out = llm.generate([ids], params)[0].outputs[0]
            seconds = time.perf_counter() - t0
            logits = first[max(first)]
            cell = dict(sp=sp, length=n, depth=depth, rope=rope, kv=kv, prompt_tokens=len(ids),
                        key=key, answer=out.text, tokens=out.token_ids,
                        found=found_key(out.text, key), seconds=seconds)
            ref_key = _cell_key(sp, n, depth, rope)
            if kv == "auto":
                _REFERENCE_LOGITS[ref_key] = logits
            elif ref_key in _REFERENCE_LOGITS:
                ref = _REFERENCE_LOGITS[ref_key]
                p_ref = torch.log_softmax(ref.double(), -1)
                p_q = torch.log_softmax(logits.double(), -1)
                cell["kl_vs_auto"] = float((p_ref.exp() * (p_ref - p_q)).sum())
                cell["max_abs_logit_diff_vs_auto"] = float((ref - logits).abs().max())
                cell["same_tokens_as_auto"] = out.token_ids == results["cells"][ref_key]["tokens"]
            results["cells"][_cell_key(sp, n, depth, rope, kv)] = cell
            extra = "" if "kl_vs_auto" not in cell else (
                f" KL {cell['kl_vs_auto']:.2e} max|dlogit| {cell['max_abs_logit_diff_vs_auto']:.3f}"
                f" same tokens {cell['same_tokens_as_auto']}")
            print(f"SP={sp} kv={kv:8} {rope:6} n={n:6} depth={depth:4.2f}: "
                  f"{'found' if cell['found'] else 'MISSED':6} {out.text!r} ({seconds:.1f} s)"
                  + extra, flush=True)
            save()


def run_hf(ckpt: Path, n: int, depth: float, rope: str, overrides: dict | None, args,
           results: dict, save) -> None:
    key = _cell_key("hf", n, depth, rope)
    if key in results["cells"]:
        return
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.hf_threads)
    tok = load_tokenizer(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, config=load_hf_config(ckpt, overrides),
                                                 dtype=torch.float32).eval()
    ids = passkey_prompt(tok, n, depth, _key_for(n, depth))
    t0 = time.perf_counter()
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=args.max_tokens, do_sample=False,
                             eos_token_id=None, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    tokens = gen[0, len(ids):].tolist()
    text = tok.decode(tokens, skip_special_tokens=True)
    results["cells"][key] = dict(sp="hf", length=n, depth=depth, rope=rope, prompt_tokens=len(ids),
                                 key=_key_for(n, depth), answer=text, tokens=tokens,
                                 found=found_key(text, _key_for(n, depth)),
                                 seconds=time.perf_counter() - t0)
    print(f"HF     {rope:6} n={n:6} depth={depth:4.2f}: {text!r}", flush=True)
    save()


def agreement(results: dict, sps: list[int]) -> list[dict]:
    """For each HF cell: its answer and, per SP size, whether sp-serve's tokens are the same."""
    rows = []
    for key, hf in sorted(results["cells"].items()):
        if hf["sp"] != "hf":
            continue
        row = {"length": hf["length"], "depth": hf["depth"], "rope": hf["rope"], "hf_answer": hf["answer"]}
        for sp in sps:
            ours = results["cells"].get(_cell_key(sp, hf["length"], hf["depth"], hf["rope"]))
            row[f"sp{sp}"] = None if ours is None else ours["tokens"] == hf["tokens"]
        rows.append(row)
    return rows


def heatmap(results: dict, sps: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in results["cells"].values() if c["sp"] != "hf"]
    rows = sorted({(c["rope"] != "native", c["length"], c["rope"]) for c in cells})
    depths = sorted({c["depth"] for c in cells})
    kvs = list(dict.fromkeys(c.get("kv", "auto") for c in cells))
    panels = [(sp, kv) for sp in sps for kv in kvs]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 + 1.1 * len(depths) * len(panels),
                                                      1 + 0.6 * len(rows)), squeeze=False)
    for ax, (sp, kv) in zip(axes[0], panels):
        grid = torch.full((len(rows), len(depths)), float("nan"))
        for c in cells:
            if c["sp"] == sp and c.get("kv", "auto") == kv:
                row = rows.index((c["rope"] != "native", c["length"], c["rope"]))
                grid[row, depths.index(c["depth"])] = float(c["found"])
        ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(depths)):
                v = grid[i, j].item()
                label = "" if v != v else ("found" if v else "missed")  # v != v: NaN, not run
                ax.text(j, i, label, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(rows)), [f"{n}" + ("" if r == "native" else f" ({r})") for _, n, r in rows])
        ax.set_xlabel("needle depth")
        ax.set_title(f"SP={sp}" + ("" if kv == "auto" else f", KV {kv}"))
    axes[0][0].set_ylabel("prompt tokens")
    fig.suptitle("SmolLM2-135M-Instruct pass-key retrieval (sp-serve, greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = _args()
    ckpt = gguf_checkpoint(args.model or default_model().path) if (args.model or "").endswith(".gguf") \
        or args.model is None else Path(args.model)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "needle.json"
    results = json.loads(out.read_text()) if args.resume and out.exists() else {"cells": {}}
    results["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    def save() -> None:
        results["agreement"] = agreement(results, args.sp)
        out.write_text(json.dumps(results, indent=1))

    long_sp = args.sp if args.long_sp is None else args.long_sp
    for sp in args.sp:
        for kv in args.kv_cache_dtypes:
            run_cells(ckpt, sp, args.lengths, args.depths, "native", None, args, results, save,
                      kv)
            if args.long_lengths and sp in long_sp:
                run_cells(ckpt, sp, args.long_lengths, args.depths, "yarn", args.long_overrides,
                          args, results, save, kv)
    for cell in args.hf_cells:
        n, depth = int(cell.split(":")[0]), float(cell.split(":")[1])
        long = n in args.long_lengths
        run_hf(ckpt, n, depth, "yarn" if long else "native", args.long_overrides if long else None,
               args, results, save)
    save()
    heatmap(results, args.sp, args.out_dir / "needle.png")
    for row in results["agreement"]:
        print(row)


if __name__ == "__main__":
    main()
