"""The `text-diffusion` transformers pipeline around the masked-diffusion sampler.

    pipe = transformers.pipeline("text-diffusion", model=folder, trust_remote_code=True)
    pipe("Once upon a time", steps=16, max_new_tokens=32, seed=0)
    pipe([{"role": "user", "content": "hi"}], strategy="confidence")
    for update in pipe("hi", stream=True): print(update["generated_text"])

Imports only torch, transformers, the standard library and the sibling sampler modules: this
file is copied beside the weights of every exported model folder (see `models/export.py`), where
transformers' dynamic-module loader imports it together with `sampler.py`.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from transformers import AutoModelForMaskedLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .options import DEFAULTS_KEY, method_options
from .sampler import SamplerConfig, SampleResult, TokenIds, generate
from .sampler import stream as sample_states

TASK = "text-diffusion"
MASK_SYMBOL = "░"
SAMPLER_OPTIONS = frozenset(f.name for f in dataclasses.fields(SamplerConfig))

Message = dict[str, str]
PromptInput = str | Sequence[Message]


def is_chat(value: Any) -> bool:
    """A non-empty list of {"role": ..., "content": ...} messages."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def is_empty_prompt(prompt: PromptInput) -> bool:
    """A blank string, or a chat whose last user message is blank."""
    if isinstance(prompt, str):
        return not prompt.strip()
    users = [m for m in prompt if m["role"] == "user"]
    return bool(users) and not str(users[-1]["content"]).strip()


def render(
    tokenizer: Any, ids: Sequence[int], mask_id: int, stop_ids: Sequence[int], mask_symbol: str = MASK_SYMBOL
) -> str:
    """Decode a canvas up to its first stop token, each mask shown as `mask_symbol`."""
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    parts = []
    for is_mask, run in itertools.groupby(ids[:end], key=lambda t: t == mask_id):
        run = list(run)
        parts.append(mask_symbol * len(run) if is_mask else tokenizer.decode(run, skip_special_tokens=True))
    return "".join(parts)


class TextDiffusionPipeline(Pipeline):
    """Generate text with a masked-diffusion LM (a ModernBertForMaskedLM trained by dgpt_core).

    Inputs: a string (continued as plain text), a chat (list of role/content dicts, formatted by
    the tokenizer's chat template with the assistant prompt appended), or a list of either; a list
    is sampled as one batch (or in chunks of `batch_size`). Every field of `SamplerConfig` is a
    call keyword; defaults come from `config.sampler_defaults` of the model folder.

    An empty prompt (blank string, or a chat whose last user message is blank) raises ValueError.
    A prompt whose tokens and the canvas (`max_new_tokens`, or `block_size` in block mode) exceed
    the model's `max_position_embeddings` gives a UserWarning: the sampler keeps the newest
    tokens that fit and cuts the oldest.

    Output: per input, `[{"generated_text": str, "nfe": int, "stopped": bool}]`. With
    `stream=True` the call returns a generator of dicts `{"step", "nfe", "done",
    "generated_text", "token_ids"}` (text and ids of the canvas so far, masks shown as
    `mask_symbol`; str / list for a single input, lists of them for a batch).
    """

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        defaults = getattr(self.model.config, DEFAULTS_KEY, None) or {}
        self._forward_params = {**self._sanitize_parameters(**defaults)[1], **self._forward_params}
        self.token_ids = TokenIds.from_tokenizer(self.tokenizer)

    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        unknown = sorted(set(kwargs) - SAMPLER_OPTIONS)
        if unknown:
            raise TypeError(f"unknown text-diffusion options {unknown}; valid: {sorted(SAMPLER_OPTIONS)}")
        if kwargs.get("stop_token_ids") is not None:
            kwargs["stop_token_ids"] = tuple(kwargs["stop_token_ids"])
        if "strategy" in kwargs:  # a decoding method name: a strategy and its +modifiers
            kwargs = {**method_options(kwargs.pop("strategy")), **kwargs}
        return {}, kwargs, {}

    def __call__(
        self,
        inputs: PromptInput | Sequence[PromptInput],
        stream: bool = False,
        mask_symbol: str = MASK_SYMBOL,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]] | Iterator[dict[str, Any]]:
        if isinstance(inputs, str) or is_chat(inputs):
            batch, single = [inputs], True
        elif (
            isinstance(inputs, (list, tuple))
            and inputs
            and all(isinstance(i, str) or is_chat(i) for i in inputs)
        ):
            batch, single = list(inputs), False
        else:
            raise TypeError(
                "text-diffusion expects a string, a chat (list of role/content dicts) or a list of those"
            )
        empty = [i for i, prompt in enumerate(batch) if is_empty_prompt(prompt)]
        if empty:
            where = "" if single else f" (inputs {empty})"
            raise ValueError(f"empty prompt{where}: give some text, or a user message with content")
        options = {**self._forward_params, **self._sanitize_parameters(**kwargs)[1]}
        config = SamplerConfig(**options)
        prompt_ids = self.preprocess(batch)["prompt_ids"]
        self._warn_if_cut(prompt_ids, config, single)
        if stream:
            return self._stream(prompt_ids, config, mask_symbol, single)
        size = batch_size or self._batch_size or len(batch)
        outputs = []
        for i in range(0, len(batch), size):
            result = self.forward({"prompt_ids": prompt_ids[i : i + size]}, **options)
            outputs.extend(self.postprocess(result))
        return outputs[0] if single else outputs

    def _warn_if_cut(self, prompt_ids: Sequence[Sequence[int]], config: SamplerConfig, single: bool) -> None:
        """Warn for each prompt that, with the canvas, exceeds the model's maximum length."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is None:
            return
        canvas = min(config.block_size or config.max_new_tokens, config.max_new_tokens)
        for i, ids in enumerate(prompt_ids):
            cut = len(ids) + canvas - limit
            if cut > 0:
                which = "prompt" if single else f"prompt {i}"
                warnings.warn(
                    f"{which} of {len(ids)} tokens + canvas of {canvas} exceeds the model's maximum length "
                    f"of {limit}: the oldest {min(cut, len(ids))} prompt tokens are cut",
                    UserWarning,
                    stacklevel=3,
                )

    def preprocess(self, inputs: Sequence[PromptInput]) -> dict[str, Any]:
        """Token ids per prompt; chats go through the chat template with the assistant prompt."""
        texts = [
            self.tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
            if is_chat(p)
            else p
            for p in inputs
        ]
        return {"prompt_ids": [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]}

    def _forward(self, model_inputs: dict[str, Any], **options: Any) -> SampleResult:
        return generate(self.model, model_inputs["prompt_ids"], self.token_ids, SamplerConfig(**options))

    def postprocess(self, result: SampleResult) -> list[list[dict[str, Any]]]:
        return [
            [
                {
                    "generated_text": self.tokenizer.decode(ids, skip_special_tokens=True),
                    "nfe": result.nfe,
                    "stopped": stop,
                }
            ]
            for ids, stop in zip(result.answers, result.stopped)
        ]

    def _stream(
        self, prompt_ids: Sequence[Sequence[int]], config: SamplerConfig, mask_symbol: str, single: bool
    ) -> Iterator[dict[str, Any]]:
        stops = config.stop_ids(self.token_ids)
        for state in sample_states(self.model, prompt_ids, self.token_ids, config):
            rows = state.canvas.tolist()
            texts = [render(self.tokenizer, row, self.token_ids.mask, stops, mask_symbol) for row in rows]
            yield {
                "step": state.step,
                "nfe": state.nfe,
                "done": state.done,
                "generated_text": texts[0] if single else texts,
                "token_ids": rows[0] if single else rows,
            }


if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=TextDiffusionPipeline, pt_model=AutoModelForMaskedLM, type="text"
    )
