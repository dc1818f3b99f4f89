"""Perplexity of a long real document with the default model (SmolLM2-135M-Instruct, float32)
in sp-serve at SP = 1 and 2 (prompt logprobs: each rank scores its own zigzag share in
vocabulary chunks) against Hugging Face transformers on the same tokens.

    python benchmarks/perplexity.py [--text FILE] [--tokens 7000] [--sp 1 2] [--json out.json]

The document: the GNU GPL v3 text (/usr/share/common-licenses/GPL-3 on Debian, 35 KB; any
text file with --text), its first --tokens tokens. Perplexity = exp(-mean log p(t_i | t_<i))
over tokens 2..n. sp-serve: `LLM.generate(prompt_logprobs=0, max_tokens=1)`, one torch thread
per rank, the fcfs scheduler, --chunk tokens per prefill step. transformers: one forward pass
(SDPA attention, as many threads as sp-serve has ranks) and log_softmax of its full
[tokens x vocab] logits, the way an evaluation harness computes it.

Time: the request alone (the model is loaded and warmed up before). Peak memory: each
process's peak resident set (VmHWM) over the request, after resetting it (/proc/PID/clear_refs
5), and that peak minus the resident set just before (the memory the request itself took).
It measures and prints; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from sp_serve import LLM, SamplingParams
from sp_serve.model import load_tokenizer
from sp_serve.model.gguf import gguf_checkpoint
from sp_serve.model.source import default_model

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--tokens", type=int, default=7000)
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunk", type=int, default=8192, help="prefill tokens per step")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak resident memory of some processes over a block of code, in MiB."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def __enter__(self) -> "PeakMemory":
        for pid in self.pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.before = [_status_kib(pid, "VmRSS") / 1024 for pid in self.pids]
        return self

    def __exit__(self, *exc) -> None:
        self.peak = [_status_kib(pid, "VmHWM") / 1024 for pid in self.pids]
        self.added = [p - b for p, b in zip(self.peak, self.before)]


def _perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def run_sp_serve(ckpt: Path, sp: int, ids: list[int], chunk: int) -> dict:
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    with LLM(str(ckpt), sp_size=sp, scheduler="fcfs", max_num_batched_tokens=chunk,
             cpu_threads=1) as llm:
        llm.generate([ids[:256]], params)  # warm-up
        pids = [os.getpid()] + [p.pid for p in llm.engine._procs]
        with PeakMemory(pids) as mem:
            start = time.perf_counter()
            out = llm.generate([ids], params)[0]
            seconds = time.perf_counter() - start
    logprobs = [e[t].logprob for e, t in zip(out.prompt_logprobs[1:], ids[1:])]
    result = {"run": f"sp-serve SP={sp}", "seconds": seconds, "perplexity": _perplexity(logprobs),
              "peak_mib_per_rank": mem.peak, "added_mib_per_rank": mem.added,
              "logprobs": logprobs}
    print({k: v for k, v in result.items() if k != "logprobs"}, flush=True)
    return result


def run_hf(ckpt: Path, threads: int, ids: list[int]) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        model(torch.tensor([ids[:256]]))  # warm-up
        with PeakMemory([os.getpid()]) as mem:
            start = time.perf_counter()
            logits = model(torch.tensor([ids])).logits[0].float()
            logprobs = torch.log_softmax(logits[:-1], -1).gather(
                1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
            seconds = time.perf_counter() - start
    del logits
    result = {"run": f"transformers ({threads} thread{'s' if threads > 1 else ''})",
              "seconds": seconds, "perplexity": _perplexity(logprobs),
              "peak_mib_per_rank": mem.peak, "added_mib_per_rank": mem.added,
              "logprobs": logprobs}
    print({k: v for k, v in result.items() if k != "logprobs"}, flush=True)
    return result


def main() -> None:
    args = _args()
    ckpt = gguf_checkpoint(default_model().path)
    tokenizer = load_tokenizer(ckpt)
    ids = tokenizer.encode(args.text.read_text())[:args.tokens]
    results = {"text": str(args.text), "tokens": len(ids), "chunk": args.chunk,
               "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                           "load_avg_start": os.getloadavg()}, "runs": []}
    for sp in args.sp:
        results["runs"].append(run_sp_serve(ckpt, sp, ids, args.chunk))
    if not args.no_hf:
        results["runs"].append(run_hf(ckpt, max(args.sp), ids))
    results["machine"]["load_avg_end"] = os.getloadavg()
    ref = results["runs"][-1]["logprobs"]
    print(f"\n{len(ids)} tokens of {args.text}\n")
    print("| run | perplexity | max abs diff of a token's logprob vs last row | seconds | "
          "peak MiB per rank (added by the request) |\n|---|---|---|---|---|")
    for r in results["runs"]:
        diff = max(abs(a - b) for a, b in zip(r["logprobs"], ref))
        mem = ", ".join(f"{p:.0f} (+{a:.0f})" for p, a in zip(r["peak_mib_per_rank"],
                                                               r["added_mib_per_rank"]))
        print(f"| {r['run']} | {r['perplexity']:.4f} | {diff:.1e} | {r['seconds']:.1f} | {mem} |")
    if args.json:
        for r in results["runs"]:
            r.pop("logprobs")
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
