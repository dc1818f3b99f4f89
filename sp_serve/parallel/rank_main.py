"""A rank started by `launch.RankProcess`: `python -m sp_serve.parallel.rank_main RANK`.

Reads (entry, args), pickled and length-prefixed, on stdin and runs entry(*args). The rest of
stdin is a lifeline: it ends only when rank 0 closes its end or dies, and then this rank exits
at once rather than wait for its next collective to time out. Ctrl-C in a terminal reaches every
process of the foreground group; rank 0 alone handles it and tells the ranks to stop.
"""
from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import threading

_STDIN = 0  # read as a raw fd: a thread blocked in sys.stdin would hold its lock at shutdown


def _read_exactly(n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(_STDIN, n)
        if not chunk:
            raise SystemExit("sp-serve rank: rank 0 closed the pipe before sending the work")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_work() -> tuple:
    (size,) = struct.unpack("<Q", _read_exactly(8))
    return pickle.loads(_read_exactly(size))


def _exit_when_rank0_goes(rank: str) -> None:
    while os.read(_STDIN, 4096):  # b"" at end of file: rank 0 died (a rank 0 that stops
        pass                      # normally reaps or kills its ranks before closing the pipe)
    print(f"sp-serve rank {rank}: rank 0 is gone; stopping", file=sys.stderr, flush=True)
    os._exit(1)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    entry, args = read_work()
    threading.Thread(target=_exit_when_rank0_goes, args=(sys.argv[1],), daemon=True,
                     name="rank0-lifeline").start()
    entry(*args)


if __name__ == "__main__":
    main()
