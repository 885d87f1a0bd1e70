"""Request bodies of the OpenAI-compatible endpoints, and OpenAI-style error objects.

Fields OpenAI defines that the server does not honour (logprobs, penalties, tools, user, ...)
are accepted and ignored, so stock clients work; the sampler's own options go in the extra
`sampler` object, whose unknown keys are refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dgpt_core.cli_errors import validation_message


class ApiError(Exception):
    """A request the server refuses: answered with `status` and an OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """The OpenAI error object: `{"error": {"message", "type", "param", "code"}}`."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class SamplerOptions(BaseModel):
    """The extra `sampler` object: decoding options beyond OpenAI's fields (see SamplerConfig);
    those not given come from the model folder's sampler_defaults."""

    model_config = ConfigDict(extra="forbid")

    strategy: str | None = None
    """A decoding method: a strategy with optional +modifiers (e.g. `confidence+guard`)."""
    steps: int | None = Field(default=None, ge=1)
    """Denoising steps (per block); a cap for threshold and eb."""
    threshold: float | None = None
    """Confidence a position needs to be revealed by strategy=threshold."""
    eb_gamma: float | None = None
    """Entropy budget per step of strategy=eb."""
    block_size: int | None = Field(default=None, ge=1)
    """Semi-autoregressive blocks of this many tokens (None: the whole canvas at once)."""
    canvas_blocks: int | None = Field(default=None, ge=1)
    """Windows of the canvas revealed left to right."""
    remask: Literal["off", "cap", "rescale", "conf"] | None = None
    """ReMDM remasking of revealed tokens."""
    no_repeat_ngram_size: int | None = Field(default=None, ge=0)
    """Repetition guard n-gram size (0 = off)."""
    edit: bool | None = None
    """Seed-Diffusion editing of visible tokens."""
    prefix_cache: bool | None = None
    """Key/value cache of the context: exact for a block-causal model (on by default), Fast-dLLM's
    approximate prefix cache for a full-canvas one (off by default)."""

    def given(self) -> dict[str, Any]:
        """The options set in the request."""
        return self.model_dump(exclude_none=True)


class StreamOptions(BaseModel):
    include_usage: bool = False
    """Send a last chunk with the usage of the whole request."""


class CommonRequest(BaseModel):
    """Fields shared by chat and plain completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    """The model id; any value is accepted (the server serves one model)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens per answer; longer than the model's canvas, the canvas is decoded in blocks."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """Newer OpenAI name of max_tokens; used when max_tokens is not given."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    """Token temperature (0 = greedy); default: the model folder's."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus filtering; default: the model folder's."""
    seed: int | None = None
    """Fixed seed: the request is decoded on its own, so its text does not depend on other requests."""
    stop: str | list[str] | None = None
    """Strings that end an answer (cut before the first found)."""
    n: int = Field(default=1, ge=1)
    """Answers per request."""
    stream: bool = False
    """Answer as server-sent events in OpenAI's chunk format."""
    stream_options: StreamOptions | None = None
    """OpenAI's stream options (include_usage)."""
    sampler: SamplerOptions | None = None
    """Extra: the diffusion sampler's options."""
    denoise: bool = False
    """Extra: the stream also carries the canvas after every denoising step (masks as '░')."""

    def answer_limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    """The conversation; system (or developer) messages first."""


class CompletionRequest(CommonRequest):
    prompt: str | list[str] = Field(min_length=1)
    """Plain text to continue, or a list of texts (decoded in one batch; choice p * n + i answers
    prompt p), as OpenAI's API takes it."""

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """The request body validated as `model`; an ApiError (400) naming the first bad field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, validation_message(err), param=param) from None
