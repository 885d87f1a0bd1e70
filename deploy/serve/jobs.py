"""From an API request to a DecodeJob: the sampler settings (request over model folder defaults),
the canvas that `max_tokens` maps onto, the prompt's token ids, and the limits checked on the way."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

from dgpt_core._cli.generate import chat_context
from dgpt_core.generation.options import STRATEGIES, SamplerConfig, method_options, trained_block_size
from dgpt_core.generation.pipeline import Message, TextDiffusionPipeline, is_empty_prompt
from dgpt_core.models.info import model_info_of, read_sampler_defaults

from .batching import DecodeJob
from .protocol import ApiError, ChatCompletionRequest, CommonRequest, CompletionRequest
from .settings import ServeSettings

SYSTEM_ROLES = ("system", "developer")


class ModelService:
    """The served model: its id, defaults and limits, and how requests become jobs."""

    def __init__(self, pipe: TextDiffusionPipeline, settings: ServeSettings) -> None:
        self.pipe, self.settings = pipe, settings
        self.model_id = Path(settings.model_dir).absolute().name or "model"
        # The folder's seed is dropped: without an explicit seed, batched requests share one
        # generator, and a fixed default seed would keep every request from batching.
        self.defaults = {k: v for k, v in read_sampler_defaults(settings.model_dir).items() if k != "seed"}
        self.base = SamplerConfig(**self.defaults)
        info = model_info_of(pipe.model)
        self.context_messages = None if info is None else info.context_messages
        self.max_len: int | None = getattr(pipe.model.config, "max_position_embeddings", None)
        self.block_size = trained_block_size(pipe.model)
        """A block-causal model's block size: its answers have any length up to max_tokens, block by block."""

    def describe(self) -> dict[str, Any]:
        """The model object of GET /v1/models, with the sampler facts the chat page needs."""
        return {
            "id": self.model_id, "object": "model", "created": 0, "owned_by": "dgpt",
            "sampler_defaults": {**self.defaults, "strategy": self.base.strategy, "steps": self.base.steps},
            "strategies": list(STRATEGIES), "canvas": self.base.max_new_tokens,
            "max_tokens_cap": self.settings.max_tokens_cap, "max_n": self.settings.max_n,
            "context_length": self.max_len, "chat": self.pipe.tokenizer.chat_template is not None,
        }

    def chat_job(self, req: ChatCompletionRequest, loop: asyncio.AbstractEventLoop) -> DecodeJob:
        if self.pipe.tokenizer.chat_template is None:
            raise ApiError(400, f"model {self.model_id} has no chat template: use /v1/completions",
                           param="messages", code="no_chat_template")
        messages: list[Message] = [{"role": m.role, "content": m.text()} for m in req.messages]
        lead = next((i for i, m in enumerate(messages) if m["role"] not in SYSTEM_ROLES), len(messages))
        system = "\n".join(m["content"] for m in messages[:lead]) or None
        chat = chat_context(messages[lead:], system, self.context_messages)
        if not messages[lead:] or is_empty_prompt(chat):
            raise ApiError(400, "no user message with content to answer", param="messages", code="empty_prompt")
        prompt_ids = self.pipe.preprocess([chat])["prompt_ids"]
        return self._job(req, prompt_ids, "messages", loop)

    def completion_job(self, req: CompletionRequest, loop: asyncio.AbstractEventLoop) -> DecodeJob:
        prompts = req.prompts()
        for i, prompt in enumerate(prompts):
            if is_empty_prompt(prompt):
                where = "" if isinstance(req.prompt, str) else f" (prompt {i})"
                raise ApiError(400, f"empty prompt{where}: give some text to continue", param="prompt",
                               code="empty_prompt")
        return self._job(req, self.pipe.preprocess(prompts)["prompt_ids"], "prompt", loop)

    def _job(self, req: CommonRequest, prompts: list[list[int]], prompt_param: str,
             loop: asyncio.AbstractEventLoop) -> DecodeJob:
        limits = self.settings
        if len(prompts) * req.n > limits.max_n:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={req.n} answers is over this server's limit of "
                           f"{limits.max_n} per request", param="n", code="n_too_large")
        stop = req.stop_strings()
        if len(stop) > limits.max_stop_sequences:
            raise ApiError(400, f"{len(stop)} stop sequences: at most {limits.max_stop_sequences}", param="stop")
        answer_limit = req.answer_limit()
        if answer_limit is not None and answer_limit > limits.max_tokens_cap:
            raise ApiError(400, f"max_tokens={answer_limit} is over this server's limit of {limits.max_tokens_cap}",
                           param="max_tokens", code="max_tokens_too_large")
        base = self._sampler_config(req)
        if base.steps > limits.max_steps:
            raise ApiError(400, f"steps={base.steps} is over this server's limit of {limits.max_steps}",
                           param="sampler.steps")
        config, answer_limit = fit_canvas(base, answer_limit, self.block_size)
        width = min(self.block_size or config.block_size or config.max_new_tokens, config.max_new_tokens)
        longest = max(len(p) for p in prompts)
        if self.max_len is not None and longest + width > self.max_len:
            raise ApiError(400, f"the prompt of {longest} tokens and a canvas of {width} exceed the "
                           f"model's context of {self.max_len} tokens", param=prompt_param,
                           code="context_length_exceeded")
        return DecodeJob(prompts, config, req.n, answer_limit, stop, req.stream and req.denoise, loop)

    def _sampler_config(self, req: CommonRequest) -> SamplerConfig:
        """The request's sampler settings over the folder's defaults; a 400 when invalid."""
        given = req.sampler.given() if req.sampler else {}
        options = dict(self.defaults)
        if "strategy" in given:
            try:
                options.update(method_options(given.pop("strategy")))
            except ValueError as err:
                raise ApiError(400, str(err), param="sampler.strategy") from None
        options.update(given)
        for name in ("temperature", "top_p"):
            if getattr(req, name) is not None:
                options[name] = getattr(req, name)
        options["seed"] = req.seed
        try:
            return SamplerConfig(**options)
        except ValueError as err:
            raise ApiError(400, str(err), param="sampler") from None


def fit_canvas(config: SamplerConfig, max_tokens: int | None,
               trained_block: int | None = None) -> tuple[SamplerConfig, int]:
    """The sampler settings and the tokens kept per answer for `max_tokens`. A block-causal model
    (`trained_block`) decodes block by block until a stop token, so max_tokens is its limit as it
    is. A full-canvas model: up to its canvas (`max_new_tokens` of its defaults) the canvas is
    decoded whole and the answer cut to max_tokens, since the model was trained on that canvas;
    beyond it, the canvas grows by whole blocks of the canvas size (or the `block_size` asked for),
    decoded semi-autoregressively."""
    canvas = config.max_new_tokens
    if trained_block is not None and max_tokens is not None:
        return config.replace(max_new_tokens=max_tokens), max_tokens
    if max_tokens is None or max_tokens <= canvas:
        return config, max_tokens or canvas
    block = config.block_size or canvas
    return config.replace(max_new_tokens=math.ceil(max_tokens / block) * block, block_size=block), max_tokens
