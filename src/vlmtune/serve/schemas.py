"""Request and response bodies: the OpenAI chat-completions subset vlmtune speaks, and its own endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageURL(BaseModel):
    url: str = Field(description="a data: URI holding the image bytes (data:image/jpeg;base64,...)")
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. The image is the one `image_url` part; the text of the last user message is
    the question (none: the image is captioned). Fields OpenAI defines and vlmtune does not use are ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(
        None, description="base or adapter name from GET /v1/models (default: first run)"
    )
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlmtune"
    root: str = Field(description="the run directory, or the base model")
    parent: str | None = Field(None, description="the base model, for an adapter")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CaptionResponse(BaseModel):
    model: str
    caption: str
    finish_reason: Literal["stop", "length"]
    seconds: float = Field(description="time the server spent on the request, queueing included")


class AskResponse(BaseModel):
    model: str
    question: str
    answer: str
    finish_reason: Literal["stop", "length"]
    seconds: float


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
