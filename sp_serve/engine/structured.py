"""Structured output: JSON schema, any JSON object, a regex, a choice or a Lark grammar, enforced
by a token mask from llguidance on rank 0.

Why llguidance (docs/architecture.md says more): it computes each step's mask lazily from the
grammar's current lexer state (tens of microseconds per token on a CPU, no per-grammar compile
pass over the vocabulary, so a new schema costs nothing up front), accepts JSON schema, regex
and Lark grammars, is a single self-contained wheel (Rust, no torch or CUDA build), and is one
of vLLM's and SGLang's backends. The masks of a step are computed in a thread while the ranks
run the step's forward pass (llguidance releases the GIL), so they stay off the critical path.

vLLM's names: SamplingParams.structured_outputs = StructuredOutputsParams(json=..., regex=...,
choice=..., grammar=..., json_object=True), exactly one of them.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

# JSON without free whitespace: every byte the model emits is content, and a weak model cannot
# loop on blanks until max_tokens cuts the document.
_JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict | str | None = None  # a JSON schema (dict, or its JSON text)
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None  # a Lark grammar (llguidance's dialect)
    json_object: bool | None = None  # any JSON object

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured outputs take exactly one of json, regex, choice, grammar "
                             f"or json_object; got {', '.join(given) or 'none'}")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured outputs: choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        grammar_text(self)  # ValueError for a grammar llguidance refuses

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def key(self) -> str:
        json_part = self.json if not isinstance(self.json, dict) else json.dumps(self.json,
                                                                                  sort_keys=True)
        return repr((json_part, self.regex, self.choice, self.grammar, self.json_object))


def grammar_text(params: StructuredOutputsParams) -> str:
    """llguidance's grammar for the request; ValueError (the client's 400) if it is invalid."""
    from llguidance import LLMatcher

    try:
        if params.json is not None:
            schema = json.loads(params.json) if isinstance(params.json, str) else params.json
            if not isinstance(schema, dict):
                raise ValueError("must be a JSON object")
            grammar = LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        elif params.json_object:
            grammar = LLMatcher.grammar_from_json_schema({"type": "object"},
                                                         overrides=_JSON_OPTIONS)
        elif params.regex is not None:
            grammar = LLMatcher.grammar_from_regex(params.regex)
        elif params.choice is not None:
            grammar = LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in params.choice))
        else:
            grammar = LLMatcher.grammar_from_lark(params.grammar)
    except ValueError as exc:
        raise ValueError(f"structured outputs: the schema is not valid JSON ({exc})") from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"structured outputs: {error.splitlines()[0][:300]}")
    return grammar


class GrammarMasks:
    """Rank 0's grammar state for the sequences that have one: a matcher each, advanced with
    every sampled token, and the next token's mask computed in a worker thread during the
    step's forward pass (start) and collected before sampling (take). `compile` may run in any
    thread (the server compiles a request's grammar before it reaches the engine thread)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer = None  # built on first use (a walk over the vocabulary)
        self._matchers: dict[int, Any] = {}
        self._pending: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _lltokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf
                if self._hf_tokenizer is None:
                    raise ValueError("structured outputs need the model's tokenizer")
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos or None)
            return self._tokenizer

    def compile(self, params: StructuredOutputsParams):
        """A fresh matcher for the grammar; ValueError if llguidance refuses it."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self._lltokenizer(), grammar_text(params), log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured outputs: {matcher.get_error()[:300]}")
        return matcher

    def add(self, seq_id: int, params: StructuredOutputsParams, compiled=None) -> None:
        """compiled: a matcher from `compile` for these params (each sequence gets a copy)."""
        self._matchers[seq_id] = (self.compile(params) if compiled is None
                                  else compiled.deep_copy())

    def remove(self, seq_id: int) -> None:
        self._matchers.pop(seq_id, None)
        future = self._pending.pop(seq_id, None)
        if future is not None:
            future.cancel()

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._matchers

    def start(self, seq_ids: list[int]) -> None:
        """Begins the masks of these sequences' next tokens (in a thread)."""
        wanted = [s for s in seq_ids if s in self._matchers and s not in self._pending]
        if not wanted:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="sp-serve-grammar")
        for seq_id in wanted:
            self._pending[seq_id] = self._pool.submit(self._mask, self._matchers[seq_id])

    def _mask(self, matcher) -> torch.Tensor:
        import llguidance.torch as llt

        mask = torch.full(llt.get_bitmask_shape(1, self._vocab_size), -1, dtype=torch.int32)
        llt.fill_next_token_bitmask(matcher, mask, 0)
        return mask

    def take(self, seq_id: int) -> torch.Tensor | None:
        """The bitmask of the sequence's next token (None: no grammar)."""
        if seq_id not in self._matchers:
            return None
        self.start([seq_id])
        return self._pending.pop(seq_id).result()

    def advance(self, seq_id: int, token_id: int) -> bool:
        """Feeds the sampled token; True when the grammar is complete (the output must end)."""
        matcher = self._matchers[seq_id]
        if not matcher.consume_token(token_id):
            raise RuntimeError(f"the grammar refused token {token_id}: {matcher.get_error()[:200]}")
        return matcher.is_stopped()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def apply_bitmask(x_v: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Logits [vocab] with the tokens the grammar forbids at -inf."""
    import llguidance.torch as llt

    x_v = x_v.clone()
    llt.apply_token_bitmask_inplace(x_v, bitmask)
    return x_v
