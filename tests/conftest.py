"""Shared fixtures. Checkpoints are written once per session (transformers writes them)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default tiny Llama checkpoint (with tokenizer), as make_tiny_model writes it."""
    from sp_serve.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(name) -> dir of tests.checkpoints.CHECKPOINT_CASES[name], written once."""
    from tests.checkpoints import CHECKPOINT_CASES, write_hf_checkpoint

    cases = dict(CHECKPOINT_CASES)
    root = tmp_path_factory.mktemp("hf-checkpoints")
    written: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in written:
            written[name] = write_hf_checkpoint(root / name, **cases[name])
        return written[name]

    return get
