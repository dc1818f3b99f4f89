"""`sp-serve serve`: the engine on rank 0, the HTTP frontend beside it, graceful stop.

SIGINT/SIGTERM drain the server: it stops accepting connections (and new requests on open ones
get 503), lets running requests finish for up to --shutdown-timeout seconds (vLLM's flag), then
ends each one still running with an error (a 503 envelope, or an error event and `data: [DONE]`
on a stream), tells every rank to stop, reaps them and exits 0. A second SIGINT quits at once.
A rank that dies turns /health to 503 and ends the server with exit code 1.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn

from sp_serve.config import EngineConfig
from sp_serve.engine.async_engine import AsyncEngine
from sp_serve.engine.engine import LLMEngine
from sp_serve.server.app import build_app

log = logging.getLogger("sp_serve")
# After --shutdown-timeout, the time the ended streams get to send their last events before
# uvicorn cancels what is left.
FLUSH_S = 5.0


class _Server(uvicorn.Server):
    """uvicorn re-raises a caught SIGTERM/SIGINT once it has stopped serving (uvicorn >= 0.29),
    which kills the process before run_server stops the ranks: exit code 143 and an orphaned
    rank. Here the signal only starts the graceful stop; run_server then exits with 0."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self._on_stop()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Drain:
    """The stop after a signal: new requests are refused at once; after timeout_s, those still
    running are ended with an error. The waiting happens on a thread, not in the handler."""

    def __init__(self, aengine: AsyncEngine, timeout_s: float) -> None:
        self._aengine = aengine
        self._timeout_s = timeout_s
        self._done = threading.Event()

    def start(self) -> None:
        self._aengine.drain()
        threading.Thread(target=self._run, name="sp-serve-drain", daemon=True).start()

    def finish(self) -> None:
        self._done.set()

    def _run(self) -> None:
        stats = self._aengine.stats()
        log.info("stopping: %d request(s) running, %d waiting; waiting up to %g s for them "
                 "(--shutdown-timeout)", stats.num_running, stats.num_waiting, self._timeout_s)
        if not self._done.wait(self._timeout_s):
            log.warning("--shutdown-timeout passed: ending the requests still running")
            self._aengine.abort_all(f"the server is shutting down (--shutdown-timeout "
                                    f"{self._timeout_s:g} s passed)")


def model_info(engine: LLMEngine, config: EngineConfig) -> dict:
    """What /v1/models shows under `sp_serve` (and `bench serve` records as tags)."""
    return {"sp_size": engine.sp_size, "tp_size": engine.tp_size,
            "attn_backend": engine.attn_backend, "scheduler": config.scheduler,
            "device": engine.device_name}


def run_server(config: EngineConfig, args: argparse.Namespace) -> int:
    engine = LLMEngine(config)  # under torchrun, ranks other than 0 serve plans in here and exit
    name = args.served_model_name or config.model
    aengine = AsyncEngine(engine, name)
    info = model_info(engine, config)
    app = build_app(aengine, served_model_name=name, chat_template=args.chat_template, extra_model_info=info)
    drain = Drain(aengine, args.shutdown_timeout)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port,
                                    log_level=args.uvicorn_log_level,
                                    timeout_graceful_shutdown=args.shutdown_timeout + FLUSH_S),
                     on_stop=drain.start)
    failed = threading.Event()

    def watch_health() -> None:
        while not server.should_exit:
            if not aengine.is_healthy():
                log.error("the engine or a rank died: shutting the server down")
                failed.set()
                server.should_exit = True
                return
            time.sleep(0.5)

    threading.Thread(target=watch_health, daemon=True).start()
    log.info("serving %s on http://%s:%d (tp_size=%d x sp_size=%d)", name, args.host, args.port,
             engine.tp_size, engine.sp_size)
    try:
        server.run()
    finally:
        drain.finish()
        aengine.close()
        engine.shutdown()
    code = 1 if failed.is_set() else 0
    # The last word of rank 0 (under torchrun the launcher's own exit code after a signal is 1
    # whatever the ranks did: this line says how the server itself ended).
    log.info("stopped: every rank is down; exit code %d", code)
    return code
