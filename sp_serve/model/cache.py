"""Directories built once and reused: the tiny checkpoints and converted GGUF files.

A stamp file in the directory records what it was built from (a JSON object); a directory
whose stamp matches is reused, one whose stamp differs is rebuilt, and a non-empty directory
without a stamp is not ours and is left alone. A build goes into a temporary sibling that is
renamed into place, so a crash never leaves half a checkpoint, and builders take a lock on the
parent directory first, so ranks starting together (torchrun) build once while the rest wait.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """$SP_SERVE_CACHE, default ~/.cache/sp-serve."""
    return Path(os.environ.get("SP_SERVE_CACHE", "~/.cache/sp-serve")).expanduser()


def cached_dir(target: str | Path, stamp_name: str, want: dict[str, Any],
               build: Callable[[Path], None], what: str) -> Path:
    """target, built by build(dir) unless its stamp already records `want`.

    what: the kind of directory, for the message when target is someone else's."""
    target = Path(target)
    text = json.dumps(want, sort_keys=True)  # fails now, not after the build, on odd values
    stamp = target / stamp_name
    if _stamped(stamp, text):
        return target
    if not stamp.is_file() and target.is_dir() and any(target.iterdir()):
        raise ValueError(f"{target} is not empty and holds no {stamp_name}: not a cached {what}, "
                         "so it is left alone; remove it or choose another directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent):
        if _stamped(stamp, text):  # built by another process while this one waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            (tmp / stamp_name).write_text(text)
            if target.exists():
                stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=target.parent))
                try:
                    target.rename(stale / "old")
                except OSError:
                    pass  # another process replaced it first
                shutil.rmtree(stale, ignore_errors=True)
            try:
                tmp.rename(target)
            except OSError:
                pass  # another process (without the lock: e.g. on NFS) won the race
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _stamped(stamp: Path, text: str) -> bool:
    try:
        return json.dumps(json.loads(stamp.read_text()), sort_keys=True) == text
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on the directory itself (no lock file to leave behind)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
