"""OpenAI protocol models (completions, chat completions, models)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Field names, types and defaults follow the OpenAI API reference. Unlike the resource models, these ignore
# unknown fields: OpenAI clients send vendor extensions, and there is no server-owned field to protect.
# Features this server does not implement are declared and refused when asked for (400), never ignored.


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)  # no coercion ("1" is not a number): what the schema says

    include_usage: bool = False


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(..., min_length=1, description="The served model id (GET /v1/models)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (deterministic); default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=8, description="Choices to generate for the prompt")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the text ends before the first")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Sampling with the same seed repeats itself")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)

    @model_validator(mode="after")
    def _supported(self) -> OpenAIRequest:
        if isinstance(self.stop, list) and (len(self.stop) > 4 or any(not s for s in self.stop)):
            raise ValueError("stop: at most 4 non-empty strings")
        if self.stop == "":
            raise ValueError("stop: must not be empty")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty / frequency_penalty are not supported (use 0 or leave unset)")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextContentPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] = Field(..., description="Text, or a list of text content parts")
    name: str | None = None


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI in favour of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "content_filter"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str = Field(..., description="v{N}: the model version that answered")
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChatCompletionDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: ChatCompletionDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] = Field(..., description="A prompt, or a list of prompts (n choices each)")
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default for completions is 16")
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not 1 <= len(self.prompt) <= 16:
            raise ValueError("prompt: a list of 1 to 16 prompts")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of is not supported (leave it unset or equal to n)")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None


class CompletionResponse(BaseModel):
    """Also the shape of each streamed chunk (OpenAI streams `text_completion` objects)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "unlearn"
    active_version: int = Field(..., description="The model version this process serves now (extension)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
