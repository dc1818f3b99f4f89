"""`sp-serve generate` / `make-tiny-model` as a user runs them: outputs, bad input (one clear line,
non-zero exit, no traceback), no process left behind, and a dead rank never hangs the others."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest


def _run(args, mark, timeout=240, **kw):
    env = dict(os.environ, SP_SERVE_TEST_MARK=mark, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sp_serve.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)


def _marked_processes(mark: str) -> list[int]:
    """Live processes started with our marker in their environment (spawned ranks inherit it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"SP_SERVE_TEST_MARK={mark}".encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _assert_none_left(mark: str, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while _marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _marked_processes(mark), "a rank process was left behind"


def test_generate_json_same_tokens_at_sp1_and_sp2(tiny_model_dir, tmp_path):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"prompt": "hello world"}) + "\n\n" + json.dumps({"prompt_token_ids": [5, 9, 2]}) + "\n")
    args = ["generate", "--model", str(tiny_model_dir), "--prompt-token-ids", "1,2,3", "--prompt", "a b c",
            "--input", str(jsonl), "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--json"]
    outs = {}
    for sp in (1, 2):
        mark = uuid.uuid4().hex
        r = _run([*args, "--sp-size", str(sp)], mark)
        assert r.returncode == 0, r.stderr[-2000:]
        lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 4
        assert lines[0]["prompt_token_ids"] == [1, 2, 3]  # command-line order is kept
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        assert lines[1]["prompt_token_ids"] == tok.encode("a b c")
        assert lines[2]["prompt_token_ids"] == tok.encode("hello world")
        assert lines[3]["prompt_token_ids"] == [5, 9, 2]
        assert all(len(x["output_token_ids"]) == 6 and isinstance(x["text"], str) for x in lines)
        outs[sp] = [x["output_token_ids"] for x in lines]
        _assert_none_left(mark)
    assert outs[1] == outs[2]


def _corrupt_checkpoints(src: Path, root: Path) -> dict[str, tuple[Path, str]]:
    cases = {}

    def clone(name):
        d = root / name
        shutil.copytree(src, d)
        return d

    cases["missing"] = (root / "nope", "config.json not found")
    d = clone("badjson"); (d / "config.json").write_text("{not json")
    cases["badjson"] = (d, "config.json")
    d = clone("arch"); cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]; (d / "config.json").write_text(json.dumps(cfg))
    cases["arch"] = (d, "LlamaForCausalLM")
    d = clone("noweights")
    for f in d.glob("*.safetensors"):
        f.unlink()
    cases["noweights"] = (d, "safetensors")
    d = clone("truncated")
    for f in d.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cases["truncated"] = (d, "safetensors")
    return cases


def test_perplexity_verb_at_sp2_matches_hf(tiny_model_dir, tmp_path):
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    doc = tmp_path / "doc.txt"
    doc.write_text("Sequence parallelism splits one long prompt over several ranks. " * 8)
    mark = uuid.uuid4().hex
    r = _run(["perplexity", "--model", str(tiny_model_dir), "-sp", "2", "--scheduler", "fcfs",
              "--max-num-batched-tokens", "32", "--text", str(doc), "--json"], mark)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.splitlines()[-1])
    ids = AutoTokenizer.from_pretrained(tiny_model_dir).encode(doc.read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    mean = float(ref[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean())
    assert got["tokens"] == len(ids)
    assert abs(got["perplexity"] - math.exp(-mean)) < 1e-4 * math.exp(-mean)
    _assert_none_left(mark)
    r = _run(["perplexity", "--model", str(tiny_model_dir), "--text", str(tmp_path / "none.txt")],
             uuid.uuid4().hex)
    assert r.returncode == 2 and "cannot read --text" in r.stderr


def test_bad_checkpoints_fail_with_one_clear_line(tiny_model_dir, tmp_path):
    for name, (path, needle) in _corrupt_checkpoints(Path(tiny_model_dir), tmp_path).items():
        mark = uuid.uuid4().hex
        r = _run(["generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "2", "-sp", "2"], mark)
        assert r.returncode == 2, (name, r.returncode, r.stderr[-1500:])
        assert "Traceback" not in r.stderr, (name, r.stderr[-1500:])
        assert "sp-serve: error:" in r.stderr and needle in r.stderr, (name, r.stderr[-1500:])
        _assert_none_left(mark)


@pytest.mark.parametrize("args,needle", [
    (["--sp-size", "0"], "--sp-size must be >= 1"),
    (["--max-model-len", "8", "--prompt-token-ids", "1,2,3,4,5,6,7"], "maximum context length is 8"),
    (["--prompt-token-ids", "1,x"], "comma-separated integers"),
    (["--temperature", "-1"], "temperature"),
    (["--input", "/nonexistent.jsonl"], "cannot read --input"),
    (["--step-log", "/nonexistent-dir/steps.jsonl"], "--step-log '/nonexistent-dir/steps.jsonl': cannot write"),
    (["--hf-overrides", "{rope: 2}"], "must be a JSON object"),
    (["--max-model-len", "10000"], "use at most 4096, or stretch the context with RoPE scaling, e.g. "
     '--hf-overrides \'{"rope_scaling": {"rope_type": "yarn", "factor": 3.0, '
     '"original_max_position_embeddings": 4096}, "max_position_embeddings": 12288}\''),
    (["--tokenizer", "/nonexistent-dir"], "--tokenizer /nonexistent-dir: no tokenizer there"),
])
def test_bad_arguments(tiny_model_dir, args, needle):
    mark = uuid.uuid4().hex
    base = ["generate", "--model", str(tiny_model_dir), "--max-tokens", "2"]
    if not any(a.startswith("--prompt") or a == "--input" for a in args):
        base += ["--prompt", "hi"]
    r = _run([*base, *args], mark)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert needle in r.stderr, r.stderr[-1500:]
    _assert_none_left(mark)


def test_bad_jsonl_line_names_the_line(tiny_model_dir, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    r = _run(["generate", "--model", str(tiny_model_dir), "--input", str(f)], uuid.uuid4().hex)
    assert r.returncode == 2 and f"{f}:2" in r.stderr, r.stderr[-1500:]


def test_make_tiny_model_cli(tmp_path):
    r = _run(["make-tiny-model", str(tmp_path / "m"), "--arch", "qwen2", "--seed", "3"], uuid.uuid4().hex)
    assert r.returncode == 0, r.stderr[-1500:]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and (tmp_path / "m" / "tokenizer.json").exists()


_DEATH_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from sp_serve import LLM, SamplingParams
    if __name__ == "__main__":
        # A dist timeout far beyond the test's own: the error must come from noticing the exit.
        llm = LLM(sys.argv[1], sp_size=2, dist_timeout_s=3600)
        print("CHILD", llm.engine._procs[0].pid, flush=True)
        if sys.argv[2] == "kill-worker":
            os.kill(llm.engine._procs[0].pid, signal.SIGKILL)
            time.sleep(0.5)
            t = time.monotonic()
            try:
                llm.generate([[1, 2, 3] * 20], SamplingParams(max_tokens=4, temperature=0))
                print("NO ERROR", flush=True)
            except RuntimeError as exc:
                print("ERROR", round(time.monotonic() - t, 1), exc, flush=True)
            llm.shutdown()
        else:  # rank 0 dies abruptly: its worker must notice and exit by itself
            os.kill(os.getpid(), signal.SIGKILL)
""")


def _run_death_script(tmp_path, model_dir, mode: str, mark: str) -> subprocess.CompletedProcess:
    script = tmp_path / "death.py"
    script.write_text(_DEATH_SCRIPT)
    env = dict(os.environ, SP_SERVE_TEST_MARK=mark, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script), str(model_dir), mode],
                          capture_output=True, text=True, timeout=180, env=env)


def test_worker_death_gives_a_clear_error_fast(tiny_model_dir, tmp_path):
    mark = uuid.uuid4().hex
    r = _run_death_script(tmp_path, tiny_model_dir, "kill-worker", mark)
    line = next((x for x in r.stdout.splitlines() if x.startswith(("ERROR", "NO ERROR"))), r.stdout)
    assert line.startswith("ERROR"), (line, r.stderr[-1500:])
    # "rank 1 exited": the peer's exit was noticed, not a timeout waited out (3600 s, beyond the
    # subprocess's 180 s).
    assert "rank 1 exited" in line
    _assert_none_left(mark)


def test_driver_death_stops_the_worker(tiny_model_dir, tmp_path):
    mark = uuid.uuid4().hex
    proc = _run_death_script(tmp_path, tiny_model_dir, "kill-driver", mark)
    assert proc.returncode == -signal.SIGKILL
    assert "CHILD" in proc.stdout
    _assert_none_left(mark, within_s=45)  # the worker's next heartbeat wait fails; it exits


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_bad_shutdown_timeout_is_a_usage_error(value, capsys):
    from sp_serve.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--shutdown-timeout", value])
    assert info.value.code == 2 and "seconds >= 0" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--shutdown-timeout", "0"]).shutdown_timeout == 0
