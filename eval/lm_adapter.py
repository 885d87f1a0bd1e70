"""lm-eval model adapter for our masked-diffusion models: `lm_eval --model dgpt`.

    lm = DiffusionLM(pretrained="runs/x/sft/model", strategy="confidence", steps=16)
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=...)

- generate_until: the sampler (strategy, steps, block size, temperature, seed) on a fixed canvas
  (the adapter's `canvas`, else the task's max_gen_toks capped at `max_canvas`); every `until`
  string is honoured (special tokens among them also stop the sampler);
- loglikelihood: LLaDA's Monte-Carlo masked estimate over the continuation only (`mc_num`
  draws), and is_greedy from greedy decoding of the continuation's length (confidence order,
  argmax tokens, one token per step);
- loglikelihood_rolling: minus the ELBO bound of the text (fixed t grid, seeded masks).

Likelihood masks are seeded by the request content, so a number never depends on batching.
Arguments left unset: sampler options take the model folder's `sampler_defaults`, then
`SamplerConfig`'s own defaults; likelihood settings (mc_num, t_points, mask_draws, batch_size,
seed, greedy_check) take the defaults of the eval suite's `EvalConfig`.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dgpt_core.config.evaluation import DEFAULTS_METHOD, EvalConfig
from dgpt_core.diffusion.elbo import elbo_nll, stable_seed
from dgpt_core.generation.options import DEFAULTS_KEY, method_options, trained_block_size
from dgpt_core.generation.sampler import SamplerConfig, TokenIds, generate
from dgpt_core.generation.schedules import get_schedule
from dgpt_core.models.info import ModelInfo, model_info_of

from .likelihood import greedy_matches, mc_nll, split_windows, windows_to_rows

EVAL_DEFAULTS = EvalConfig()
"""Where the likelihood settings left unset come from (lm-eval builds the adapter from a string)."""


def _int_or_none(value: Any) -> int | None:
    return None if value in (None, "", "None", "none") else int(value)


@dataclasses.dataclass(frozen=True)
class FolderDefaults:
    """What a model folder says about decoding it (config.json's sampler_defaults and model info),
    used for every adapter argument left unset."""

    sampler: dict[str, Any]
    """Sampler options of the folder (`SamplerConfig`'s defaults stand for those it lacks)."""
    schedule: str
    t_eps: float
    canvas: int | None
    """The SFT answer canvas the model was trained on (None: the task's max_gen_toks)."""
    max_new_tokens: int | None
    """The folder's own `max_new_tokens` (the canvas of the `defaults` method)."""

    @classmethod
    def of(cls, model: torch.nn.Module) -> FolderDefaults:
        config = getattr(model, "config", None)
        sampler = dict(getattr(config, DEFAULTS_KEY, None) or {})
        max_new_tokens = sampler.pop("max_new_tokens", None)
        info = model_info_of(model) or ModelInfo("untrained")
        canvas = info.answer_canvas if info.kind == "sft" else None
        return cls(sampler, sampler.get("schedule", info.schedule), float(sampler.get("t_eps", info.t_eps)), canvas,
                   max_new_tokens)


@register_model("dgpt", "diffusiongpt")
class DiffusionLM(LM):
    """A ModernBertForMaskedLM trained by dgpt_core, behind lm-eval's three request types."""

    def __init__(
        self,
        pretrained: str | None = None,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        strategy: str | None = None,
        steps: int | None = None,
        threshold: float | None = None,
        block_size: int | None = None,
        canvas_blocks: int | None = None,
        temperature: float | None = None,
        top_p: float = 1.0,
        seed: int = EVAL_DEFAULTS.seed,
        canvas: int | None = None,
        max_canvas: int = 256,
        mc_num: int = EVAL_DEFAULTS.mc_num,
        greedy_check: bool = EVAL_DEFAULTS.greedy_check,
        t_points: int = EVAL_DEFAULTS.ppl_t_points,
        mask_draws: int = EVAL_DEFAULTS.ppl_mask_draws,
        schedule: str | None = None,
        t_eps: float | None = None,
        batch_size: int | str | None = EVAL_DEFAULTS.batch_size,
        device: str | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("DiffusionLM needs `pretrained` (a saved model folder) or `model` + `tokenizer`")
            from transformers import ModernBertForMaskedLM

            from dgpt_core.models.tokenizer import load_tokenizer

            model = ModernBertForMaskedLM.from_pretrained(pretrained)
            tokenizer = tokenizer or load_tokenizer(pretrained)
        if tokenizer is None:
            raise ValueError("DiffusionLM needs the model's tokenizer")
        self.model = model.to(device) if device else model
        self.model.eval()
        self.tokenizer = tokenizer
        self.ids = TokenIds.from_tokenizer(tokenizer)
        self.name = str(pretrained or type(model).__name__)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 512))
        folder = FolderDefaults.of(model)
        if strategy == DEFAULTS_METHOD:  # the folder's own decoding, whole: nothing else may change it
            strategy = steps = threshold = block_size = temperature = canvas_blocks = None
            canvas = folder.max_new_tokens
        self.sampler = SamplerConfig(**{
            **folder.sampler,
            **(method_options(strategy) if strategy is not None else {}),
            **{k: v for k, v in {"steps": _int_or_none(steps), "threshold": threshold,
                                 "block_size": _int_or_none(block_size), "temperature": temperature,
                                 "canvas_blocks": _int_or_none(canvas_blocks)}.items()
               if v is not None},
            "top_p": float(top_p), "seed": int(seed),
        })
        schedule = schedule or folder.schedule
        t_eps = float(t_eps) if t_eps is not None else folder.t_eps
        self.seed = int(seed)
        self.canvas = _int_or_none(canvas) or folder.canvas
        self.max_canvas = int(max_canvas)
        self.mc_num = int(mc_num)
        self.greedy_check = str(greedy_check).lower() not in {"false", "0", "no"}
        self.t_points, self.mask_draws = int(t_points), int(mask_draws)
        self.schedule = get_schedule(schedule, float(t_eps))
        bs = _int_or_none(batch_size) if not str(batch_size).startswith("auto") else None
        self.batch_size = bs or EVAL_DEFAULTS.batch_size
        self.stats: dict[str, float] = defaultdict(float)
        """Totals over generate_until calls: batches, requests, nfe, seconds, stopped, answer_tokens."""
        self.generations: list[dict[str, Any]] = []
        """Every generate_until result: task, context, output, stopped, answer_tokens."""

    # ------------------------------------------------------------------------------------------
    # text <-> ids

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Continuation ids as they are inside the joint text (lm-eval's convention), trailing
        spaces of the context moved to the continuation (not newlines: a chat prompt ends with
        `assistant\n`, which belongs to the prompt)."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        if whole[: len(ctx)] == ctx:
            return ctx, whole[len(ctx) :]
        return ctx, self.encode(continuation)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "dgpt").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    # ------------------------------------------------------------------------------------------
    # generate_until

    def _canvas(self, gen_kwargs: dict[str, Any]) -> int:
        if self.canvas is not None:
            return self.canvas
        asked = gen_kwargs.get("max_gen_toks") or gen_kwargs.get("max_new_tokens") or self.max_canvas
        return max(1, min(int(asked), self.max_canvas))

    def _stops(self, until: list[str]) -> tuple[int, ...]:
        stops = list(self.ids.default_stops)
        for text in until:
            idx = self.tokenizer.convert_tokens_to_ids(text) if text in self.tokenizer.all_special_tokens else None
            if isinstance(idx, int) and idx not in stops:
                stops.append(idx)
        return tuple(stops)

    @staticmethod
    def cut_until(text: str, until: list[str]) -> str:
        """The text before the first occurrence of any `until` string."""
        cut = len(text)
        for stop in until:
            if stop:
                at = text.find(stop)
                if at != -1:
                    cut = min(cut, at)
        return text[:cut]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = defaultdict(list)
        parsed = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            parsed.append((context, until))
            groups[(self._canvas(gen_kwargs), tuple(until))].append(i)
        for (canvas, until), members in groups.items():
            config = self.sampler.replace(max_new_tokens=canvas, stop_token_ids=self._stops(list(until)))
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                prompts = [self.encode(parsed[i][0]) or [self.ids.eos] for i in batch]
                t0 = time.perf_counter()
                result = generate(self.model, prompts, self.ids, config)
                seconds = time.perf_counter() - t0
                self.stats["batches"] += 1
                self.stats["requests"] += len(batch)
                self.stats["nfe"] += result.nfe
                self.stats["seconds"] += seconds
                for i, answer, stopped in zip(batch, result.answers, result.stopped):
                    text = self.cut_until(self.tokenizer.decode(answer, skip_special_tokens=False), list(until))
                    out[i] = text
                    self.stats["stopped"] += float(stopped)
                    self.stats["answer_tokens"] += len(answer)
                    self.generations.append({
                        "task": getattr(requests[i], "task_name", None), "context": parsed[i][0],
                        "output": text, "stopped": bool(stopped), "answer_tokens": len(answer),
                    })
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [o or "" for o in out]

    # ------------------------------------------------------------------------------------------
    # likelihoods

    def _score(self, pairs: list[tuple[list[int], list[int]]], kind: str) -> list[float]:
        """-log p(continuation | context) per pair: `mc` (LLaDA) or `elbo` (t grid)."""
        rows, owner, seeds = [], [], []
        for p, (ctx, cont) in enumerate(pairs):
            for w, row in enumerate(windows_to_rows(split_windows(ctx, cont, self.max_len))):
                rows.append(row)
                owner.append(p)
                seeds.append(stable_seed(kind, self.seed, w, *row.ids, "|", *row.targets))
        common = {"mask_id": self.ids.mask, "pad_id": self.ids.pad, "batch_size": self.batch_size,
                  "block_size": trained_block_size(self.model)}
        if kind == "mc":
            nll = mc_nll(self.model, rows, seeds, mc_num=self.mc_num, **common)
        else:
            nll = elbo_nll(self.model, rows, seeds, schedule=self.schedule, t_points=self.t_points,
                           mask_draws=self.mask_draws, **common)
        totals = [0.0] * len(pairs)
        for p, value in zip(owner, nll):
            totals[p] += value
        return totals

    def _greedy(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
        """Whether greedy decoding of len(continuation) tokens after the context gives it."""
        never = [i for i in (self.ids.mask, self.ids.pad, self.ids.im_start, self.ids.delete) if i is not None]
        return greedy_matches(self.model, pairs, mask_id=self.ids.mask, pad_id=self.ids.pad, never_ids=never,
                              max_len=self.max_len, batch_size=self.batch_size)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        nll = self._score(pairs, "mc")
        greedy = self._greedy(pairs) if self.greedy_check else [False] * len(pairs)
        out = []
        for req, (_, cont), value, flag in zip(requests, pairs, nll, greedy):
            result = (0.0, True) if not cont else (-float(value), bool(flag))
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        pairs = [([], self.encode(req.args[0])) for req in requests]
        nll = self._score(pairs, "elbo")
        out = []
        for req, value in zip(requests, nll):
            out.append(-float(value))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, out[-1])
        return out

    def get_model_info(self) -> dict[str, Any]:
        return {"model_name": self.name, "sampler": dataclasses.asdict(self.sampler)}
