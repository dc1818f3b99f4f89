"""A `sp-serve serve` process for end-to-end tests: start it on a free port, read its metrics
and log, find and reap its rank processes (by /proc), wait with a hang guard."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

START_TIMEOUT_S = 180


# ---- a server process -----------------------------------------------------------------------------
@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    model: str
    log: Path

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                                  timeout=300)

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, name: str, **labels: str) -> float:
        """One sample by metric name (labels beyond model_name given as keywords), 0 if absent."""
        want = {"model_name": self.model, **labels}
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base == name and _labels(rest.rstrip("}")) == want:
                return value
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for pid in descendants(self.proc.pid):
            _kill_quietly(pid)


def _labels(text: str) -> dict[str, str]:
    pairs = [p for p in text.split('",') if p]
    return {k: v.strip('"') for k, _, v in (p.partition('="') for p in pairs)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, log_dir: Path, name: str, *args: str) -> Server:
    """Starts `sp-serve serve --sp-size 2` and waits for /health; retries on a port race."""
    for attempt in range(3):
        port = _free_port()
        log = log_dir / f"{name}-{attempt}.log"
        cmd = [sys.executable, "-m", "sp_serve.cli", "serve", "--model", str(model_dir),
               "--sp-size", "2", "--port", str(port), "--served-model-name", name, *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        server = Server(proc, f"http://127.0.0.1:{port}", name, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        server.stop()
        if "address already in use" not in server.log_tail().lower():
            break
    raise AssertionError(f"the server did not come up (exit code {proc.poll()}):\n{server.log_tail()}")


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def descendants(root: int) -> list[int]:
    """Every live process below `root` (by scanning /proc parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def alive(pid: int, start_time: str) -> bool:
    """Running and still the same process (not a reused pid), zombies counting as gone."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z" and stat[19] == start_time


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_until(predicate, timeout_s: float, what: str, server: Server, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{server.log_tail()}")
        time.sleep(interval_s)
