"""Request bodies of the OpenAI API as this gateway accepts them (pydantic; they also make the
OpenAPI schema). Ranges are OpenAI's; vLLM's extras (top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, stop_token_ids, chat_template_kwargs) are accepted too. Unknown top-level fields are
ignored, as OpenAI clients send fields we do not use (metadata, store, user).

Types are strict, as OpenAI's schema is: `max_tokens: true` or `stream: "yes"` is a 400, never
coerced (an integer is still a valid number). Every string must be valid Unicode (a lone UTF-16
surrogate, which JSON's `\\ud800` escape can carry, cannot be tokenized); tool `parameters` must be a
JSON Schema; content parts are text only.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import jsonschema
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_N = 16


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it holds a lone UTF-16 surrogate)") from None
    return text


def _valid_unicode_tree(value: Any) -> Any:
    """Every string (keys too) in a JSON value is valid Unicode."""
    if isinstance(value, str):
        _valid_unicode(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _valid_unicode(key)
            _valid_unicode_tree(item)
    elif isinstance(value, list):
        for item in value:
            _valid_unicode_tree(item)
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]


class _Strict(BaseModel):
    # nested objects ignore fields they do not know, as OpenAI-compatible servers do for clients
    # newer than the schema; every known field is strictly typed
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionCall(_Strict):
    name: Text
    arguments: Text = "{}"


class ToolCallIn(_Strict):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Strict):
    """A content part; only `text` parts are supported (this model reads no images or audio)."""

    type: Text
    text: Text | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"content part type {value!r} is not supported; only 'text' parts are")
        return value

    @field_validator("text")
    @classmethod
    def _present(cls, value: str | None) -> str | None:
        if value is None:
            raise ValueError("a text part needs its text")
        return value


class Message(BaseModel):
    # assistant messages echoed back by clients carry fields we do not use (refusal, annotations)
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    reasoning_content: Text | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: Text | None = None
    name: Text | None = None


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: Text | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _json_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        _valid_unicode_tree(value)
        validator = jsonschema.validators.validator_for(value, default=jsonschema.Draft202012Validator)
        try:
            validator.check_schema(value)
        except jsonschema.SchemaError as e:
            where = "/".join(str(p) for p in e.path)
            raise ValueError(
                f"not a JSON Schema: {e.message}" + (f" (at {where})" if where else "")
            ) from None
        if value.get("type", "object") != "object":
            raise ValueError("a function's parameters must be a JSON Schema of type 'object'")
        return value


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Strict):
    name: Text


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class ThinkingSwitch(_Strict):
    """The official MiMo API's switch (as DeepSeek's and Kimi's): reasoning on or off."""

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["enabled", "disabled"]


class ChatTemplateKwargs(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt switch must not pass silently

    enable_thinking: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Text
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: ChatTemplateKwargs | None = None
    thinking: ThinkingSwitch | None = Field(
        None,
        description="reasoning on or off (the official MiMo API's switch); the same as "
        "chat_template_kwargs.enable_thinking, which it may not contradict; default: the server's mode",
    )

    def thinking_mode(self, default: bool) -> bool:
        """Whether the request wants reasoning: `thinking`, else `chat_template_kwargs.
        enable_thinking`, else the server's default. Raises ValueError when the two disagree."""
        kwargs = self.chat_template_kwargs
        explicit = kwargs.enable_thinking if kwargs and "enable_thinking" in kwargs.model_fields_set else None
        if self.thinking is None:
            return default if explicit is None else explicit
        wanted = self.thinking.type == "enabled"
        if explicit is not None and explicit != wanted:
            raise ValueError(
                f"thinking.type={self.thinking.type!r} contradicts "
                f"chat_template_kwargs.enable_thinking={str(explicit).lower()}"
            )
        return wanted


DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint


class CompletionRequest(_Sampling):
    prompt: Text | list[int] | list[Text] | list[list[int]]
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: Text | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value
