"""How `sp-serve serve --sp-size 2` stops: SIGTERM idle, SIGTERM with a stream that outlives
--shutdown-timeout and a request that does not, and a rank killed under a running stream.

    PYTHONPATH=. python benchmarks/fault_timings.py [--shutdown-timeout 3] [--json out.json]

Each scenario starts a real server on the tiny model (tests/server_proc.py, --scheduler fcfs so
no start-up profile), and reports seconds from the signal to each event, the exit code, how the
stream ended, and whether the log holds a traceback. It measures and prints; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx

from sp_serve.model.tiny import make_tiny_model
from tests.server_proc import Server, cmdline, descendants, start_server

LONG = {"prompt": [68] * 16, "max_tokens": 16000, "ignore_eos": True, "stream": True}


def _stream(server: Server, events: list, ended: dict) -> None:
    """Reads the long stream; records the last events and when and how it ended."""
    try:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=300,
                          json={"model": server.model, **LONG}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        ended["how"] = "error event + [DONE]" if events[-1] == "[DONE]" and '"error"' in events[-2] \
            else ("[DONE]" if events[-1] == "[DONE]" else "no [DONE]")
    except httpx.HTTPError as exc:
        ended["how"] = f"cut: {type(exc).__name__}"
    ended["at"] = time.monotonic()


def _start_stream(server: Server) -> tuple[threading.Thread, list, dict]:
    events: list = []
    ended: dict = {}
    thread = threading.Thread(target=_stream, args=(server, events, ended), daemon=True)
    thread.start()
    while len(events) < 3:
        time.sleep(0.05)
    return thread, events, ended


def _exit(server: Server, t0: float) -> tuple[int, float]:
    rc = server.proc.wait(timeout=300)
    return rc, round(time.monotonic() - t0, 2)


def sigterm_idle(model: Path, logs: Path, timeout_s: float) -> dict:
    server = start_server(model, logs, "idle", "--scheduler", "fcfs",
                          "--shutdown-timeout", str(timeout_s))
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rc, exit_s = _exit(server, t0)
    return {"exit_code": rc, "exit_s": exit_s,
            "traceback_in_log": "Traceback" in server.log.read_text()}


def sigterm_drain(model: Path, logs: Path, timeout_s: float) -> dict:
    server = start_server(model, logs, "drain", "--scheduler", "fcfs",
                          "--shutdown-timeout", str(timeout_s))
    thread, events, ended = _start_stream(server)
    short: dict = {}

    def short_request() -> None:
        r = httpx.post(server.url + "/v1/completions", timeout=300, json={
            "model": server.model, "prompt": [69] * 16, "max_tokens": 150, "ignore_eos": True})
        short.update(status=r.status_code, at=time.monotonic(),
                     tokens=r.json().get("usage", {}).get("completion_tokens"))

    threading.Thread(target=short_request, daemon=True).start()
    time.sleep(0.3)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=300)
    rc, exit_s = _exit(server, t0)
    return {"shutdown_timeout_s": timeout_s, "exit_code": rc, "exit_s": exit_s,
            "stream_ended_s": round(ended["at"] - t0, 2), "stream_end": ended["how"],
            "short_request": {"status": short.get("status"), "tokens": short.get("tokens"),
                              "done_s": round(short["at"] - t0, 2) if "at" in short else None},
            "traceback_in_log": "Traceback" in server.log.read_text()}


def rank_kill(model: Path, logs: Path) -> dict:
    server = start_server(model, logs, "kill", "--scheduler", "fcfs")
    thread, _, ended = _start_stream(server)
    [rank] = [p for p in descendants(server.proc.pid) if "spawn_main" in cmdline(p)]
    t0 = time.monotonic()
    os.kill(rank, signal.SIGKILL)
    first_503 = None
    while server.proc.poll() is None and first_503 is None:
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 503:
                first_503 = round(time.monotonic() - t0, 2)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    thread.join(timeout=300)
    rc, exit_s = _exit(server, t0)
    return {"health_503_s": first_503, "exit_code": rc, "exit_s": exit_s,
            "stream_ended_s": round(ended["at"] - t0, 2), "stream_end": ended["how"],
            "children_left": len(descendants(server.proc.pid))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shutdown-timeout", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "tiny", max_position_embeddings=16384)
        results = {"sigterm_idle": sigterm_idle(model, root, args.shutdown_timeout),
                   "sigterm_drain": sigterm_drain(model, root, args.shutdown_timeout),
                   "rank_kill": rank_kill(model, root)}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
