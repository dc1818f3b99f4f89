"""Token ids in, client text out: incremental detokenization and stop strings.

Decoding each new token alone is wrong twice over: a UTF-8 character can be split across
byte-level tokens (decoding the first half gives U+FFFD), and SentencePiece drops a token's
leading space when it starts the decoded span. So, as TGI and vLLM do, we decode a short window
that starts a few tokens back (seeded with the prompt's tail) and emit only the text the newest
tokens added, holding it back while it still ends in an incomplete character.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

_REPLACEMENT = "\ufffd"
# Tokens of prompt context before the first generated one: enough for a leading space to decode
# the way it does inside the full text (vLLM uses 5 as well).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0  # window start: decoded for context, never emitted again
        self._read_offset = len(self._ids)  # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """The text this token completes; '' while it is an unfinished multi-byte character."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end of a sequence, whatever is still held back (a real U+FFFD is text too)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix):]


class StopStringMatcher:
    """Cuts the text before the first stop string, across any split of the text into pieces.

    Only a suffix that could still grow into a stop string is held back, so ordinary text
    streams without delay.
    """

    def __init__(self, stop: list[str], include_stop: bool = False) -> None:
        self._stop = list(stop)
        self._include = include_stop  # vLLM's include_stop_str_in_output
        self._longest = max((len(s) for s in self._stop), default=0)
        self._pending = ""

    def feed(self, text: str, check: bool = True) -> tuple[str, str | None]:
        """(text safe to emit, the stop string matched or None). check=False: text before
        min_tokens, where stop strings do not count (vLLM), emitted as it is."""
        if not self._stop:
            return text, None
        if not check:
            out, self._pending = self._pending + text, ""
            return out, None
        self._pending += text
        hits = [(at, s) for s in self._stop if (at := self._pending.find(s)) != -1]
        if hits:
            at, matched = min(hits)
            out, self._pending = self._pending[:at + (len(matched) if self._include else 0)], ""
            return out, matched
        held = self._held_suffix_len()
        cut = len(self._pending) - held
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, None

    def _held_suffix_len(self) -> int:
        # A match found later can only start in a suffix that is a prefix of some stop string
        # (shorter than it, or it would have matched now); hold the longest such suffix.
        for k in range(min(self._longest - 1, len(self._pending)), 0, -1):
            tail = self._pending[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class TextStream:
    """One choice's text: detokenize token by token, then apply stop strings."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str],
                 include_stop: bool = False, min_tokens: int = 0) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = StopStringMatcher(stop, include_stop)
        self._min_tokens = min_tokens
        self._num_tokens = 0

    def add_token(self, token_id: int) -> tuple[str, str | None]:
        self._num_tokens += 1
        return self._stop.feed(self._detokenizer.add(token_id),
                               check=self._num_tokens >= self._min_tokens)

    def finish(self) -> tuple[str, str | None]:
        """The held-back rest at the end of the sequence (it can still complete a stop string)."""
        text, matched = self._stop.feed(self._detokenizer.flush())
        if matched is None:
            text += self._stop.flush()
        return text, matched


def token_text_lookup(tokenizer: Any, maxsize: int = 1 << 16) -> Callable[[int], str]:
    """id -> the token's own text, for logprobs (special tokens included, as vLLM shows them)."""

    @lru_cache(maxsize=maxsize)
    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    return token_text
