"""The OpenAI-compatible HTTP surface: request schemas, validation, error bodies and response JSON.

Plain pydantic + stdlib (no Ray, no torch), so every rule here is unit-testable. Validation is strict: a wrong
JSON type is an error, not a coercion ("16" is not an integer), unknown fields are errors (a typo such as
`max_token` would otherwise be silently ignored), and OpenAI fields we do not implement are accepted only at
their no-op values (`presence_penalty: 0`, `echo: false`, ...) so that clients that always send them work.

Every error is `{"error": {"message", "type", "param", "code"}}` with `param` naming the offending field,
the shape the official `openai` client parses into `openai.BadRequestError` & co.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.chat import Message, render

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_SEED = 2**63 - 1


class ApiError(Exception):
    """An error answered as an OpenAI-style JSON body. `status` is 4xx for anything the client can fix."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:  # noqa: A002
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- what travels between the ingress and a model replica ---------------------------------------------------
class RequestError(ValueError):
    """A request the model cannot serve (too long, bad token ids). Becomes a 400 naming `param`."""

    def __init__(self, param: str, message: str, code: str | None = None) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = f"{param}: {message}"
        self.code = code


@dataclass(frozen=True)
class Job:
    """One completion request, already type- and range-checked by the ingress (jobs/serving/api.py)."""

    prompts: list[str] | list[list[int]]  # text prompts or token-id prompts
    n: int = 1  # choices per prompt; choice index = prompt_index * n + j
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0  # row i samples with seed + i
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None = no logprobs; k ≥ 0 = chosen-token logprobs (+ top-k alternatives)
    max_prompt_tokens: int = 0  # limits.max_prompt_tokens: most prompt tokens over all prompts (0 = no limit)


# Error codes whose request is too large rather than malformed: answered 413 (limits.*, docs/SERVING.md).
TOO_LARGE = frozenset({"request_too_large", "prompt_too_large"})


@dataclass
class ChoiceDelta:
    """New output of one choice since its previous delta (the whole output when not streaming)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)  # character offset of each token in the completion
    finish_reason: str | None = None  # "stop" (EOS or a stop sequence) | "length"
    batch_rows: int = 0  # rows in the sampler batch that produced it (observability)
    tokens: list[str] = field(default_factory=list)  # each token decoded alone (filled when logprobs are asked)
    top_logprobs: list[dict[str, float]] | None = None  # k most likely tokens per position (non-streaming)

    def merge(self, other: ChoiceDelta) -> None:
        self.text += other.text
        self.token_ids += other.token_ids
        self.token_logprobs += other.token_logprobs
        self.text_offset += other.text_offset
        self.tokens += other.tokens
        self.finish_reason = other.finish_reason or self.finish_reason
        self.batch_rows = max(self.batch_rows, other.batch_rows)


# --- HTTP schemas -------------------------------------------------------------------------------------------------
_Float = Annotated[float, Field(allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


def check_stop(v: Any) -> Any:
    """`stop` of a completion or chat request: at most MAX_STOP sequences, none empty."""
    stops = [v] if isinstance(v, str) else (v or [])
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty strings")
    return v


class CompletionRequest(BaseModel):
    """POST /v1/completions (https://platform.openai.com/docs/api-reference/completions/create)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # optional when a single model is served
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    temperature: _Float = Field(1.0, ge=0.0, le=2.0)
    top_p: _Float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    logprobs: int | None = Field(None, ge=0, le=5)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted at their no-op values only (see module docstring).
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    presence_penalty: _Float = 0.0
    frequency_penalty: _Float = 0.0
    logit_bias: dict[str, _Float] | None = None
    suffix: str | None = None
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v:
                raise ValueError("must not be empty")
            return v
        if not v:
            raise ValueError("must not be an empty list")
        for i, p in enumerate(v):
            if isinstance(p, (str, list)) and not p:
                raise ValueError(f"item {i} must not be empty")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        return check_stop(v)

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        for name, ok in (("echo", not self.echo), ("best_of", self.best_of in (None, self.n)),
                         ("presence_penalty", self.presence_penalty == 0),
                         ("frequency_penalty", self.frequency_penalty == 0),
                         ("logit_bias", not self.logit_bias), ("suffix", self.suffix is None)):
            if not ok:
                raise ApiError(400, f"{name}: not supported by this server (leave it unset)", name, "unsupported")
        if self.stream and self.logprobs:
            raise ApiError(400, "logprobs: top alternatives are not available when streaming; use logprobs=0 "
                                "(chosen-token log-probabilities) or stream=false", "logprobs", "unsupported")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only allowed with stream=true", "stream_options")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(BaseModel):
    """POST /v1/chat/completions, rendered into a completion prompt with `chat_prompt`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: _Float = Field(1.0, ge=0.0, le=2.0)
    top_p: _Float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: _Float = 0.0
    frequency_penalty: _Float = 0.0
    user: str | None = None

    # The same rule as completions, checked here so that a bad `stop` is a 400 naming it, not a failure while
    # the chat request is turned into a completion (found by the schema fuzz, tests/cluster/test_serve_chaos.py).
    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        return check_stop(v)

    def to_completion(self) -> CompletionRequest:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return CompletionRequest(
            model=self.model, prompt=chat_prompt(self.messages), max_tokens=self.max_completion_tokens or
            self.max_tokens or 16, temperature=self.temperature, top_p=self.top_p, n=self.n,
            stop=[*stops, *CHAT_STOPS][:MAX_STOP], seed=self.seed, stream=self.stream,
            stream_options=self.stream_options, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, user=self.user,
        )


CHAT_STOPS = ("\nUser:", "\nSystem:")


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The one chat template (models/chat.py, stored in every checkpoint's tokenizer_config.json): one
    `Role: content` line per message, earlier assistant turns closed by EOS, then `Assistant:` for the model to
    continue. An SFT checkpoint trained on `messages` data ends its answer with EOS; other checkpoints stop at the
    next `\\nUser:` line. transformers' `apply_chat_template(messages, add_generation_prompt=True)` renders the same
    text from an exported checkpoint."""
    return render([Message(m.role, m.content) for m in messages], add_generation_prompt=True)


# --- parsing ---------------------------------------------------------------------------------------------------
def decode_json(body: bytes) -> Any:
    """Raw request bytes → JSON value; 400 for invalid UTF-8 or malformed JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"body: not valid UTF-8 (byte {e.start})", None, "invalid_utf8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"body: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", None,
                       "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body: must be a JSON object", None, "invalid_json")
    return data


def _check_text(value: Any, where: str) -> None:
    """JSON may carry lone surrogates (\\ud800) that are not Unicode text: reject them by name."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{where}: contains an unpaired surrogate (not valid Unicode)", where,
                           "invalid_utf8") from None
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, f"{where}.{k}")


def parse(model_cls: type[BaseModel], data: dict[str, Any]) -> Any:
    """Validate a JSON object against `model_cls`; ApiError(400) naming the first bad field."""
    for k, v in data.items():
        _check_text(v, str(k))
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        err = errors[0]
        param = _param(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        same_field = [x for x in errors if x["loc"][:1] == err["loc"][:1]]
        if len(same_field) > 1 and param in _UNION_HELP:  # every member of a union failed: say what fits
            msg = _UNION_HELP[param]
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field is missing"
        raise ApiError(400, f"{param}: {msg}", param, err["type"]) from None


_UNION_HELP = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "must be a string or a list of at most 4 strings",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "list[str]", "list[int]", "list[list[int]]", "dict[str,float]",
              "function-after[_prompt(), union[str,list[str],list[int],list[list[int]]]]"}


def _param(loc: tuple[Any, ...]) -> str:
    """pydantic location → dotted field name, dropping the union-member tags pydantic inserts."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        elif isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or p.startswith("function-")):
            continue
        else:
            parts.append(str(p))
    return ".".join(parts) or "body"


# --- responses --------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def logprobs_json(tokens: list[str], token_logprobs: list[float], offsets: list[int],
                  top: list[dict[str, float]] | None) -> dict[str, Any]:
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def completion_json(cid: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                    completion_tokens: int, created: int | None = None) -> dict[str, Any]:
    return {
        "id": cid, "object": "text_completion", "created": created or int(time.time()), "model": model,
        "choices": choices, "usage": usage_json(prompt_tokens, completion_tokens),
    }


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event (`data: …` + blank line), the framing OpenAI streams use."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def to_chat(completion: dict[str, Any], chunk: bool = False) -> dict[str, Any]:
    """Rewrite a completion (or a streamed completion chunk) as a chat.completion(.chunk)."""
    out = dict(completion, id=completion["id"].replace("cmpl-", "chatcmpl-", 1),
               object="chat.completion.chunk" if chunk else "chat.completion")
    choices = []
    for c in completion["choices"]:
        key = "delta" if chunk else "message"
        msg = {"role": "assistant", "content": c["text"]} if not chunk or c["text"] else {}
        choices.append({"index": c["index"], key: msg, "logprobs": None, "finish_reason": c["finish_reason"]})
    out["choices"] = choices
    return out
