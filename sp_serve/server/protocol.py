"""OpenAI-compatible request and response bodies, with vLLM's extensions and limits.

The field constraints here are what a client gets back as HTTP 400: each message names the
field (the validation handler in errors.py formats them). The models are the published schema
(/openapi.json), so they say exactly what is accepted: types are strict (no "yes" for true, no
false for a token id), numbers finite, strings valid Unicode (no lone UTF-16 surrogate), and
fields OpenAI defines but sp-serve cannot honour are accepted only at their no-op value, which
the schema lists as the only one. Rules a schema cannot state (a prompt that does not fit the
context, a rule between two fields) are 400s described on the field.
"""
from __future__ import annotations

import sys
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_N = 128  # OpenAI's own cap on n; each choice is a separate engine request.
MAX_LOGPROBS = 20  # SamplingParams.logprobs accepts 0..20.
# Seeds stay within the integers a double holds exactly (and a JavaScript client can send):
# JSON Schema validators compare big integers as doubles, and past 2**53 they would disagree
# with this server about the bound.
_MAX_SEED = 2**53 - 1
_DOUBLE_MAX = sys.float_info.max  # JSON numbers past it parse as inf: not finite, refused
# Token ids carry this mark in the schema; the app replaces it by the model's vocabulary bound.
TOKEN_ID_MARK = "x-sp-serve-token-id"
MODEL_MARK = "x-sp-serve-model"  # and a request's `model` by the served name (others are 404)
ROLES = ("system", "developer", "user", "assistant", "tool")


def check_text(value: str) -> str:
    """JSON may escape a lone UTF-16 surrogate ("\ud800"), which no tokenizer can encode."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"must be valid Unicode text: a lone UTF-16 surrogate "
                             f"({value[exc.start]!a}) at position {exc.start}") from None
    return value


def _integral(value: Any) -> Any:
    """JSON Schema's integer includes 3.0; a bool or a string is still refused (strict int)."""
    return int(value) if type(value) is float and value.is_integer() else value


def integer(**constraints: Any) -> Any:
    """An integer field (constraints as Field's ge, le, ...) that takes 3.0 as 3."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


Integer = integer()
Text = Annotated[str, AfterValidator(check_text)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(check_text)]
ModelName = Annotated[Text, Field(json_schema_extra={MODEL_MARK: True})]
TokenId = integer(ge=0, json_schema_extra={TOKEN_ID_MARK: True})
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Seed = integer(ge=-_MAX_SEED, le=_MAX_SEED)


def _is_token_ids(value: Any) -> bool:
    if not isinstance(value, list):
        return False
    types = set(map(type, value))  # one pass, fast on a million ids; bools are not ids
    return types <= {int} or (types <= {int, float}
                              and all(type(t) is int or t.is_integer() for t in value))


def _as_ids(value: list) -> list[int]:
    return value if all(type(t) is int for t in value) else [int(t) for t in value]


def _prompt_shape(value: Any) -> Any:
    """Checks the prompt in one pass: a million token ids through pydantic's union of four list
    types takes 0.3 s of event-loop time; and one message beats one error per union arm."""
    if isinstance(value, str):
        items = [value]
    elif _is_token_ids(value):
        items = [value := _as_ids(value)]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        items = value
    elif isinstance(value, list) and value and all(_is_token_ids(p) for p in value):
        items = value = [_as_ids(p) for p in value]
    else:
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of "
                         "lists of token ids")
    for item in items:
        if not item:
            raise ValueError("must not be empty: send at least one token")
        if isinstance(item, str):
            check_text(item)
        elif min(item) < 0:  # the vocabulary bound is checked with the model at hand
            raise ValueError(f"token ids are >= 0, got {min(item)}")
    return value


def _content_shape(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value if value is None else check_text(value)
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        for part in value:
            check_text(part["text"])
        return value
    raise ValueError("must be a string or a list of {'type': 'text', 'text': ...} parts; only "
                     "text content parts are supported by sp-serve")


def _stop_list(value: Any) -> Any:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _neutral_only(schema: dict[str, Any], what: str) -> WithJsonSchema:
    """The schema of a field sp-serve takes only at its no-op value (`schema` allows just it)."""
    return WithJsonSchema({**schema, "description": f"{what} is not supported by sp-serve; "
                           "only the value that changes nothing is accepted."})


PromptInput = Annotated[
    Any, BeforeValidator(_prompt_shape),
    WithJsonSchema(TypeAdapter(NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)]
                               | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
                               ).json_schema()),
]
StopStrings = Annotated[list[NonEmptyText], BeforeValidator(_stop_list),
                        WithJsonSchema(TypeAdapter(NonEmptyText | list[NonEmptyText] | None
                                                   ).json_schema())]
Temperature = Annotated[float, Field(ge=0.0, le=_DOUBLE_MAX)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


# Fields a request may carry that change nothing sp-serve computes, so they are accepted and
# ignored: the one place that lists them. Any other field not declared on a request model is a
# 400 naming it (extra="forbid"): a client is never silently ignored.
IGNORED_FIELDS: dict[str, str] = {
    "user": "an end-user id for the provider's abuse monitoring",
    "metadata": "the client's tags for a stored completion",
    "store": "whether the provider stores the completion (sp-serve stores nothing)",
    "service_tier": "the provider's processing tier",
    "prompt_cache_key": "a hint for the provider's prompt cache",
    "safety_identifier": "an end-user id for the provider's abuse monitoring",
    "parallel_tool_calls": "only meaningful with tools, which are refused unless empty",
}
_IGNORED = "Accepted and ignored: {}."


class _Request(BaseModel):
    # A field that is not declared is a 400 naming it; fields with an effect we cannot provide
    # are declared below and refused unless left at their neutral value; IGNORED_FIELDS lists
    # the ones accepted without effect.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(
        False, description="vLLM extension: with include_usage, every chunk carries the usage "
        "so far.")


_TOKEN_KEY = r"^[0-9]{1,9}$"  # logit_bias keys: token ids as JSON object keys
_ONE_STRUCTURED = ("400 if more than one of response_format (json_object / json_schema), "
                   "structured_outputs and guided_* is given, or if llguidance refuses the "
                   "schema, regex or grammar.")


class JsonSchemaFormat(_Request):
    """OpenAI's response_format.json_schema."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              populate_by_name=True)
    name: Text | None = None
    description: Text | None = None
    json_schema: dict[str, Any] = Field(alias="schema", description="The JSON schema.")
    strict: bool | None = Field(None, description="The output always follows the schema.")


class ResponseFormat(_Request):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object) or
    json_schema (the output is JSON matching the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="Required for json_schema.")

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.json_schema is not None) != (self.type == "json_schema"):
            raise ValueError("json_schema is given exactly when type is 'json_schema'")
        return self


class StructuredOutputs(_Request):
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object
    (400 otherwise)."""

    json_: dict[str, Any] | Text | None = Field(None, alias="json",
                                                 description="A JSON schema.")
    regex: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1)] | None = None
    grammar: Text | None = Field(None, description="A Lark grammar (llguidance's dialect).")
    json_object: bool | None = None
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              populate_by_name=True)


class SamplingRequest(_Request):
    """The sampling fields completions and chat share (vLLM's names and ranges)."""

    model: ModelName | None = None
    temperature: Temperature | None = Field(
        None, description="Below 1e-5 decoding is greedy (vLLM's rule).")
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        None, description="Nucleus sampling; the most likely token is always kept.")
    top_k: integer(ge=-1) | None = Field(None, description="-1 or 0: disabled.")
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="vLLM extension: keep tokens at least min_p times as likely as the "
        "most likely one.")
    seed: Seed | None = None
    stop: StopStrings = []
    stop_token_ids: list[integer(ge=0)] | None = None
    ignore_eos: bool = False
    n: integer(ge=1, le=MAX_N) | None = Field(
        None, description=f"400 if prompts x n exceeds {MAX_N}.")
    stream: bool | None = False
    stream_options: StreamOptions | None = Field(
        None, description="400 unless stream is true.")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=_DOUBLE_MAX)] | None = None
    logit_bias: Annotated[
        dict[Annotated[str, Field(pattern=_TOKEN_KEY)],
             Annotated[float, Field(ge=-100.0, le=100.0)]] | None,
        WithJsonSchema({"anyOf": [{"type": "object", "propertyNames": {"pattern": _TOKEN_KEY},
                                   "additionalProperties": {"type": "number", "minimum": -100.0,
                                                            "maximum": 100.0}},
                                  {"type": "null"}]})] = Field(
        None, description="Token id (as a string) -> bias added to its logit; 400 for an id "
        "out of the vocabulary.")
    min_tokens: integer(ge=0) | None = Field(
        None, description="vLLM extension: eos, stop_token_ids and stop strings cannot end the "
        "output before this many tokens; 400 if above max_tokens.")
    include_stop_str_in_output: bool = Field(
        False, description="vLLM extension: keep the matched stop string at the end of the text.")
    response_format: ResponseFormat | None = Field(
        None, description=f"json_object or json_schema: structured outputs. {_ONE_STRUCTURED}")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM extension: the output follows a JSON schema, regex, choice or "
        f"Lark grammar (llguidance). {_ONE_STRUCTURED}")
    guided_json: dict[str, Any] | Text | None = Field(
        None, description=f"vLLM's older spelling of structured_outputs.json. {_ONE_STRUCTURED}")
    guided_regex: Text | None = Field(
        None, description=f"vLLM: structured_outputs.regex. {_ONE_STRUCTURED}")
    guided_choice: Annotated[list[Text], Field(min_length=1)] | None = Field(
        None, description=f"vLLM: structured_outputs.choice. {_ONE_STRUCTURED}")
    guided_grammar: Text | None = Field(
        None, description=f"vLLM: structured_outputs.grammar. {_ONE_STRUCTURED}")
    user: Text | None = Field(None, description=_IGNORED.format(IGNORED_FIELDS["user"]))
    metadata: dict[str, Text] | None = Field(
        None, description=_IGNORED.format(IGNORED_FIELDS["metadata"]))
    store: bool | None = Field(None, description=_IGNORED.format(IGNORED_FIELDS["store"]))
    service_tier: Text | None = Field(
        None, description=_IGNORED.format(IGNORED_FIELDS["service_tier"]))
    prompt_cache_key: Text | None = Field(
        None, description=_IGNORED.format(IGNORED_FIELDS["prompt_cache_key"]))
    safety_identifier: Text | None = Field(
        None, description=_IGNORED.format(IGNORED_FIELDS["safety_identifier"]))

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, value: StreamOptions | None, info) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options can only be set when stream is true")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def structured(self) -> tuple[str, dict[str, Any]] | None:
        """(the field that asked, StructuredOutputsParams' fields), or None; ValueError when
        more than one field asks."""
        asked = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            asked.append(("response_format", {"json": rf.json_schema.json_schema}))
        if self.structured_outputs is not None:
            so = self.structured_outputs
            fields = {"json": so.json_, "regex": so.regex, "choice": so.choice,
                      "grammar": so.grammar, "json_object": so.json_object}
            asked.append(("structured_outputs", {k: v for k, v in fields.items() if v is not None}))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                          ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                asked.append((name, {key: getattr(self, name)}))
        if len(asked) > 1:
            raise ValueError("only one of response_format (json_object / json_schema), "
                             "structured_outputs and guided_* may be given; got "
                             + ", ".join(name for name, _ in asked))
        return asked[0] if asked else None

    @property
    def continuous_usage(self) -> bool:
        # as vLLM: only together with include_usage
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingRequest):
    prompt: PromptInput = Field(
        description="400 if a prompt plus max_tokens does not fit the model's context.")
    max_tokens: integer(ge=1) | None = Field(
        None, description="Default: the rest of the context.")
    logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = None
    echo: bool | None = Field(
        False, description="The prompt comes first in each choice's text and, with logprobs, "
        "its tokens first in the logprobs (the first token's logprob null: nothing predicts it).")
    prompt_logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="vLLM extension: each choice's prompt_logprobs lists, per prompt "
        "token, its logprob and rank and the top k at its position (null for the first).")
    suffix: Annotated[str | None, _neutral_only({"type": ["string", "null"], "maxLength": 0},
                                                "suffix")] = None
    best_of: Integer | None = Field(None, description="400 unless equal to n.")
    add_special_tokens: bool = True  # vLLM extension: BOS for string prompts

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported by sp-serve")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info) -> int | None:
        if value is not None and value != (info.data.get("n") or 1):
            raise ValueError("best_of other than n is not supported by sp-serve")
        return value


class ChatMessage(BaseModel):
    # Extra keys (tool_calls, tool_call_id, ...) go through to the chat template untouched.
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal[ROLES]
    content: Annotated[Any, BeforeValidator(_content_shape),
                       WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "null"}, {
                           "type": "array", "items": {
                               "type": "object", "required": ["type", "text"],
                               "properties": {"type": {"const": "text"},
                                              "text": {"type": "string"}}}}]})
                       ] = Field(None, description="Missing or null: empty text.")
    name: Text | None = None

    def for_template(self) -> dict[str, Any]:
        """The dict a Hugging Face chat template expects; text parts joined by newlines (vLLM),
        no content as empty text (templates concatenate it)."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "\n".join(part["text"] for part in self.content)
        message.setdefault("content", "")
        return message


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="400 if the chat template refuses them (e.g. roles out of order) or they do "
        "not fit the model's context.")
    max_tokens: integer(ge=1) | None = None  # deprecated by OpenAI, still honoured
    max_completion_tokens: integer(ge=1) | None = None
    logprobs: bool | None = False
    top_logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="Above 0: 400 unless logprobs is true.")
    tools: Annotated[list[Any] | None,
                     _neutral_only({"type": ["array", "null"], "maxItems": 0}, "tool calling")
                     ] = None
    add_generation_prompt: bool = True  # vLLM extension
    prompt_logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = Field(
        None, description="vLLM extension: the response's prompt_logprobs lists, per prompt "
        "token, its logprob and rank and the top k at its position; 400 with stream.")
    parallel_tool_calls: bool | None = Field(
        None, description=_IGNORED.format(IGNORED_FIELDS["parallel_tool_calls"]))

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_not_streamed(cls, value: int | None, info) -> int | None:
        if value is not None and info.data.get("stream"):
            raise ValueError("prompt_logprobs cannot be streamed on chat completions (as in "
                             "vLLM); use stream false, or /v1/completions")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list | None) -> list | None:
        if value:
            raise ValueError("tool calling is not supported by sp-serve")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        """SamplingParams.logprobs: None for none, else how many alternatives per position."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Request):
    """Exactly one of prompt or messages (400 otherwise)."""

    model: ModelName | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: ModelName | None = None
    tokens: list[TokenId]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error envelope (`object` as vLLM adds it); every 4xx and 5xx has this body."""

    object: Literal["error"] = "error"
    error: ErrorInfo


# ---------------------------------------------------------------------------------- responses


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV the prefix cache held


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = []
    # null for an echoed prompt's first token, which nothing predicts (OpenAI's echo shape)
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class PromptLogprob(BaseModel):
    """vLLM's Logprob: a token's logprob, its rank at its position (1: the most likely)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per prompt token: {token id: its logprob, and the top k's}; null for the first token.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or stop token that ended it
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extension, when asked for


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None = None


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extension, when asked for


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler) -> dict:
        # A chunk's delta carries only what changed: role once, then content.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "sp-serve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int
    sp_serve: dict[str, Any] = {}


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str
