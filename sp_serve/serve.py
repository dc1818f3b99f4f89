"""`sp-serve serve`: the engine on rank 0, the HTTP frontend beside it, graceful stop.

SIGINT/SIGTERM: uvicorn stops accepting and lets in-flight requests finish (a few seconds at
most), then the engine tells every rank to stop and rank 0 reaps them. A rank that dies turns
/health to 503 and ends the server with exit code 1.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator

import uvicorn

from sp_serve.config import EngineConfig
from sp_serve.engine.async_engine import AsyncEngine
from sp_serve.engine.engine import LLMEngine
from sp_serve.server.app import build_app

log = logging.getLogger("sp_serve")
GRACEFUL_S = 5


class _Server(uvicorn.Server):
    """uvicorn re-raises a caught SIGTERM/SIGINT once it has stopped serving (uvicorn >= 0.29),
    which kills the process before run_server stops the ranks: exit code 143 and an orphaned
    rank. Here the signal only starts the graceful stop; run_server then exits with 0."""

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


def run_server(config: EngineConfig, args: argparse.Namespace) -> int:
    engine = LLMEngine(config)  # under torchrun, ranks other than 0 serve plans in here and exit
    name = args.served_model_name or config.model
    aengine = AsyncEngine(engine, name)
    info = {"sp_size": engine.world_size, "attn_backend": engine.attn_backend,
            "scheduler": config.scheduler, "device": engine.device_name}
    app = build_app(aengine, served_model_name=name, chat_template=args.chat_template, extra_model_info=info)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                           timeout_graceful_shutdown=GRACEFUL_S))
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
    log.info("serving %s on http://%s:%d (sp_size=%d)", name, args.host, args.port, engine.world_size)
    try:
        server.run()
    finally:
        aengine.close()
        engine.shutdown()
    return 1 if failed.is_set() else 0
