"""The torchrun path, as the launch/ recipes run it: `torchrun --standalone --nproc-per-node 2
-m sp_serve.cli generate|serve` on CPU ranks. Under torchrun every launched process is a rank
(`parallel.groups.launched_by_torchrun`); rank 0 runs the engine, the others execute its plans.
Both outputs are checked against Hugging Face transformers' greedy decoding of the same
checkpoint, and `serve` is stopped the way a process manager stops the recipe: SIGTERM to
torchrun, which passes it to every rank.

No timing assertions: each wait is a generous guard against a hang.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from tests.server_proc import alive, descendants, proc_stat

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
NUM_TOKENS = 8
LONG_TOKENS = 200


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parent.parent)  # this checkout, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def hf_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation: the outside reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


def _prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, 127, (length,), generator=g).tolist()


def test_torchrun_generate_matches_hf(tiny_model_dir, tmp_path):
    prompts = [_prompt(5, 1), _prompt(67, 2)]  # 67: odd, longer than 2N chunks of the zigzag
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
    # the world (2 ranks) is --tensor-parallel-size x --sp-size
    cmd = [*TORCHRUN, "-m", "sp_serve.cli", "generate", "--sp-size", "2", "--device", "cpu",
           "--cpu-threads", "1", "--model", str(tiny_model_dir), "--input", str(jsonl), "--max-tokens", str(NUM_TOKENS),
           "--temperature", "0", "--ignore-eos", "--scheduler", "fcfs", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == len(prompts), r.stdout  # rank 0 alone prints
    assert "2 rank(s)" in r.stderr  # both processes joined one engine
    for line, prompt in zip(lines, prompts):
        assert line["prompt_token_ids"] == prompt
        assert line["output_token_ids"] == hf_greedy(tiny_model_dir, prompt, NUM_TOKENS)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_serve(model_dir, tmp_path):
    """`torchrun ... sp_serve.cli serve` on a free port, up once /health answers 200 (another
    port if that one was taken meanwhile)."""
    for attempt in range(3):
        port = _free_port()
        log = tmp_path / f"serve-{attempt}.log"
        cmd = [*TORCHRUN, "-m", "sp_serve.cli", "serve", "--sp-size", "2", "--device", "cpu",
               "--cpu-threads", "1", "--model", str(model_dir), "--served-model-name", "tiny", "--port", str(port),
               "--scheduler", "fcfs", "--kv-cache-memory", "64MiB", "--shutdown-timeout", "300"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                    start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240  # a hang guard, not a speed check
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return proc, url, log
            except httpx.HTTPError:
                time.sleep(0.5)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if "address already in use" not in log.read_text(errors="replace").lower():
            break
    raise AssertionError(f"the server did not come up:\n{log.read_text()[-3000:]}")


def test_torchrun_serve_one_request_then_sigterm(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    proc, url, log = _start_serve(tiny_model_dir, tmp_path)
    try:
        ranks = {p: s[19] for p in descendants(proc.pid) if (s := proc_stat(p)) is not None}
        info = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["sp_serve"]
        assert (info["sp_size"], info["tp_size"]) == (2, 1)

        prompt = _prompt(41, 3)
        body = {"model": "tiny", "prompt": prompt, "max_tokens": NUM_TOKENS, "temperature": 0,
                "ignore_eos": True}
        out = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
        expected = hf_greedy(tiny_model_dir, prompt, NUM_TOKENS)
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        assert out["usage"]["completion_tokens"] == NUM_TOKENS
        assert out["choices"][0]["text"] == tok.decode(
            expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        # SIGTERM (what a process manager sends the recipe's torchrun, which passes it to every
        # rank) while a request streams: the drain lets it finish on all ranks.
        body = {**body, "max_tokens": LONG_TOKENS, "stream": True}
        texts, finish = [], None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if not texts:
                    proc.send_signal(signal.SIGTERM)
                event = json.loads(line[6:])
                assert "error" not in event, (event, log.read_text()[-3000:])
                choice = event["choices"][0]
                texts.append(choice["text"])
                finish = choice["finish_reason"] or finish
        assert finish == "length", (finish, log.read_text()[-3000:])
        assert len([t for t in texts if t]) <= LONG_TOKENS
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"torchrun did not exit:\n{log.read_text()[-3000:]}") from None
        text = log.read_text(errors="replace")
        # torchrun's own exit code after a signal is 1 whatever its ranks did; what matters is
        # that rank 0 drained and stopped every rank, and no rank needed torchrun's SIGKILL.
        assert "stopped: every rank is down; exit code 0" in text, text[-3000:]
        assert "SIGKILL" not in text and "sp-serve rank" not in text, text[-3000:]
        assert not [p for p, start in ranks.items() if alive(p, start)], "a rank outlived torchrun"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
