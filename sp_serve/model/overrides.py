"""`--hf-overrides`: a JSON object merged into config.json before anything reads it (vLLM's
flag), typically to serve a checkpoint past its trained length with RoPE scaling:

    --hf-overrides '{"rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                      "original_max_position_embeddings": 8192},
                     "max_position_embeddings": 16384}'

Top-level keys replace the config's. RoPE may be given in either spelling, `rope_scaling`
(older, `type` or `rope_type`, rope_theta top-level) or `rope_parameters` (transformers 5);
either replaces the config's RoPE settings whichever spelling config.json uses, keeping its
rope_theta unless the override names one. The engine, every rank and the HF reference in the
tests read the same merged config (spec.load_hf_config).
"""
from __future__ import annotations

import json
import math
from typing import Any

_ROPE_KEYS = ("rope_scaling", "rope_parameters")


def parse_hf_overrides(text: str) -> dict[str, Any]:
    """The --hf-overrides argument: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        example = '{"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}'
        raise ValueError(f"--hf-overrides must be a JSON object, e.g. '{example}'; cannot parse "
                         f"{text!r}: {e}") from None
    check_hf_overrides(value)
    return value


def check_hf_overrides(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"--hf-overrides must be a JSON object (a dict of config.json keys), "
                         f"got {type(value).__name__}")
    rope = [k for k in _ROPE_KEYS if k in value]
    if len(rope) > 1:
        raise ValueError("--hf-overrides: give rope_scaling or rope_parameters, not both")
    if rope and value[rope[0]] is not None and not isinstance(value[rope[0]], dict):
        raise ValueError(f"--hf-overrides: {rope[0]} must be an object such as "
                         f"{{\"rope_type\": \"yarn\", \"factor\": 2.0}} or null, got {value[rope[0]]!r}")


def apply_hf_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """config.json's dict with the overrides merged in (RoPE normalised to rope_parameters)."""
    if not overrides:
        return raw
    check_hf_overrides(overrides)
    out = {**raw, **{k: v for k, v in overrides.items() if k not in _ROPE_KEYS}}
    old = out.get("rope_parameters") if isinstance(out.get("rope_parameters"), dict) else {}
    theta = overrides.get("rope_theta", out.get("rope_theta", old.get("rope_theta")))
    rope = next((overrides[k] for k in _ROPE_KEYS if k in overrides), False)
    if rope is False:  # no RoPE override: only a top-level rope_theta may need carrying over
        if "rope_theta" in overrides and old:
            out["rope_parameters"] = {**old, "rope_theta": theta}
        return out
    params = {k: v for k, v in (rope or {}).items() if k != "type"}
    params.setdefault("rope_type", (rope or {}).get("type", "default"))
    if "rope_theta" not in params and theta is not None:
        params["rope_theta"] = theta
    out.pop("rope_scaling", None)
    out["rope_parameters"] = params
    return out


def stretch_hint(native_len: int, wanted_len: int) -> str:
    """How to serve wanted_len tokens on a model trained for native_len: a yarn override (with
    max_position_embeddings to match, as transformers expects of a yarn config)."""
    factor = math.ceil(wanted_len / native_len)
    example = {"rope_scaling": {"rope_type": "yarn", "factor": float(factor),
                                "original_max_position_embeddings": native_len},
               "max_position_embeddings": native_len * factor}
    return f"--hf-overrides '{json.dumps(example)}'"
