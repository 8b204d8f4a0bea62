"""The OpenAI request bodies the coordinator accepts, as pydantic models.

Strict where Tandem chooses to be: an unknown field is a 400 naming it (vLLM only
warns), a value of the wrong type is never coerced ("5" is not 5, true is not 1),
and a field the API names but Tandem does not implement is accepted only at the
value that changes nothing (``n`` = 1, no penalties, no logprobs...). Otherwise
as the openai client and vLLM's server use them: ``max_completion_tokens``
(chat's current name for ``max_tokens``), message content as a string or a list
of text parts, chat's output defaulting to the rest of the context, and
``stream_options`` only with ``stream: true``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tandem.errors import InvalidRequest
from tandem.sampling import Sampling

COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI's and vLLM's completions API

# Named by the API, accepted only at the values that change nothing (the first is the default).
NEUTRAL: dict[str, tuple[object, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
    "min_p": (0, 0.0), "suffix": (None, ""), "logit_bias": (None, {}),
}
CHAT_NEUTRAL: dict[str, tuple[object, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "add_generation_prompt": (True,),
    "continue_final_message": (False,),
}


def _same(value: object, allowed: object) -> bool:
    """Equal and of the same type: ``true`` is not 1, ``0`` is not ``false``."""
    return type(value) is type(allowed) and value == allowed


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        parts = data.get("content") if isinstance(data, dict) else None
        if isinstance(parts, list):
            for i, p in enumerate(parts):
                kind = p.get("type") if isinstance(p, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise InvalidRequest(f"content part {i} is of type {kind!r}: this server takes text parts only")
        return data

    def text(self) -> str:
        """As vLLM's "string" content format: text parts joined by newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


def plain_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """As the chat template takes them: each content one string."""
    out = []
    for m in messages:
        d = {"role": m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


class _Common(_Strict):
    model: str | None = None
    # ranges are Sampling.validate's (one place for both APIs)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = None
    user: str | None = None
    request_id: str | None = None
    # NEUTRAL's fields: checked in _neutral before the types are
    n: Any = None
    best_of: Any = None
    echo: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    min_p: Any = None
    suffix: Any = None
    logit_bias: Any = None

    @model_validator(mode="before")
    @classmethod
    def _neutral(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise InvalidRequest("the JSON body must be an object")
        neutral = {**NEUTRAL, **(CHAT_NEUTRAL if cls is ChatRequest else {})}
        for k, allowed in neutral.items():
            if k in data and not any(_same(data[k], a) for a in allowed):
                raise InvalidRequest(f"'{k}' is not supported by this server (only {allowed[0]!r})")
        if data.get("stream_options") and not data.get("stream"):
            raise InvalidRequest("Stream options can only be defined when `stream=True`.")
        return data

    def output_limit(self) -> int | None:
        """``max_completion_tokens`` where given (it supersedes ``max_tokens``, as in vLLM)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling(self, default_max_tokens: int) -> Sampling:
        stops: tuple[str, ...] = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) \
            else tuple(self.stop)
        limit = self.output_limit()
        return Sampling(
            max_tokens=default_max_tokens if limit is None else limit,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=0 if self.top_k in (None, -1) else int(self.top_k),  # type: ignore[arg-type]
            seed=self.seed,
            stop=stops,
            ignore_eos=bool(self.ignore_eos),
            min_tokens=int(self.min_tokens or 0),
        )

    def usage_options(self) -> tuple[bool, bool]:
        """(a usage chunk at the end, usage on every chunk)."""
        o = self.stream_options
        usage = bool(o and o.include_usage)
        return usage, usage and bool(o and o.continuous_usage_stats)  # as vLLM: only with include_usage


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]

    def text_or_ids(self) -> tuple[str | None, list[int] | None]:
        p = self.prompt
        if isinstance(p, str):
            if not p:
                raise InvalidRequest("empty prompt")
            return p, None
        if not p:
            raise InvalidRequest("empty prompt")
        if all(isinstance(t, str) for t in p):
            if len(p) != 1:
                raise InvalidRequest("'prompt' must be one string or one list of token ids (batches are not "
                                     "supported)")
            return str(p[0]), None
        return None, [int(t) for t in p]


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    add_generation_prompt: Any = None
    continue_final_message: Any = None

    def plain_messages(self) -> list[dict[str, str]]:
        return plain_messages(self.messages)


class TokenizeCompletion(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChat(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: Literal[True] = True
    add_special_tokens: Literal[False] = False  # vLLM's chat default; the template has them
    continue_final_message: Literal[False] = False
    return_token_strs: bool = False

    def plain_messages(self) -> list[dict[str, str]]:
        return plain_messages(self.messages)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def parse(kind: type[BaseModel], body: object) -> Any:
    """``kind`` from a JSON body; a 400 naming the first problem, never a coerced value."""
    if not isinstance(body, dict):
        raise InvalidRequest("the JSON body must be an object")
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(describe(exc)) from None


# What a field that takes several shapes must be, for an error in words rather than one per shape.
SHAPES = {"prompt": "a string, a list of token ids or a list of one string", "stop": "a string or a list of strings",
          "content": "a string or a list of text parts"}


def describe(exc: ValidationError) -> str:
    """The first error, in words: which field, and what it must be."""
    errors = exc.errors(include_url=False, include_input=False)
    e = errors[0]
    # a union's branches each report, their names in the path: keep the fields and indices
    path = [str(p) for p in e["loc"] if not isinstance(p, str) or p in _FIELDS]
    where = ".".join(path)
    if e["type"] == "extra_forbidden":  # the unknown name itself ends the path
        known = [str(p) for p in e["loc"][:-1] if not isinstance(p, str) or p in _FIELDS]
        return f"unknown field '{'.'.join([*known, str(e['loc'][-1])])}'"
    if e["type"] == "missing":
        return f"'{where}' is required"
    shaped = [p for p in path if p in SHAPES]
    if shaped and len(errors) > 1:
        return f"'{where}' must be {SHAPES[shaped[-1]]}"
    return f"'{where}': {e['msg']}"


_FIELDS = {name for model in (StreamOptions, TextPart, ChatMessage, CompletionRequest, ChatRequest, TokenizeCompletion,
                              TokenizeChat, DetokenizeRequest) for name in model.model_fields}
