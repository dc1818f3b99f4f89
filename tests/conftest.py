"""Shared fixtures. Checkpoints are written once per session (transformers writes them)."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

import pytest

_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


class _ThisCheckoutsKernels(importlib.abc.MetaPathFinder):
    """`sp_serve_kernels` is the kernels/ folder under its installed name. When the installed
    package points at another checkout (an editable install of a sibling worktree), the tests
    would exercise that checkout's kernels: import this one's instead. Lazy (a finder, nothing
    imported here), so TRITON_INTERPRET is still read when the kernels are first imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "sp_serve_kernels":
            return importlib.util.spec_from_file_location(
                name, _KERNELS / "__init__.py", submodule_search_locations=[str(_KERNELS)])
        if name.startswith("sp_serve_kernels.") and name.count(".") == 1:
            module = _KERNELS / (name.split(".")[1] + ".py")
            return importlib.util.spec_from_file_location(name, module) if module.exists() else None
        return None


_installed = (None if "sp_serve_kernels" in sys.modules
              else importlib.util.find_spec("sp_serve_kernels"))
if (_installed is not None and _installed.origin
        and _KERNELS not in Path(_installed.origin).resolve().parents):
    sys.meta_path.insert(0, _ThisCheckoutsKernels())


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
