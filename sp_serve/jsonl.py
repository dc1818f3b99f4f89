"""JSON Lines from a user's file: every object with its `file:line`, and one clear ValueError
naming the line for anything that is not a JSON object."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def iter_jsonl_objects(lines: list[str], path: str | Path, example: str) -> Iterator[tuple[str, dict]]:
    """Yields (where, object) for each non-blank line; `example` shows a valid line in errors."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg}); each line must be one object "
                             f"like {example}") from None
        if not isinstance(obj, dict):  # a user's file: ValueError like every other line error
            raise ValueError(  # noqa: TRY004
                f"{where}: expected a JSON object like {example}, got {type(obj).__name__}")
        yield where, obj
