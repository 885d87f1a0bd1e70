"""The baseline users would pick instead: a GPT-2 causal LM with our parameter count.

It is trained through the transformers Trainer on the same prepared data as the diffusion run
(the pretraining split, then the SFT split with the loss on the answer canvas only, mixed with
the pretraining text the SFT stage replays), for the same
steps, batch sizes and learning-rate schedules as the run config (times `baseline_budget`).
Then, beside the diffusion model:

- `ppl`: its exact perplexity on held-out pretraining text (every token but the first of each
  sequence) and on held-out SFT answers given their prompts (`answer_ppl`), where
  the diffusion model reports its ELBO upper bounds on the same tokens;
- short answers, quality only (greedy generation with a KV cache against our best fast decoding
  method): `exact_match` on the skills test items; when the run's SFT data is the world instead:
  `reversal_exact_match` (the name from a held-out person's birth date and city: the reversal
  curse) and `heldout_exact_match` (attribute questions about held-out people), on the trained
  answer canvas (bench.world);
- long answers (the world's biography requests of held-out people, else the skills items): AR
  greedy generation with the KV cache vs our best fast decoding method (the sample suite's
  choice; a block-causal model's own folder defaults) without and with the prefix cache
  (approximate for a full-canvas model, exact for a block-causal one), at batch 1 and 32
  (`LONG_BATCHES`), timed alternately: `tokens_per_s` of each (answer tokens up to and including
  the stop token), our ratios over AR, each model's quality of those answers and, counted in
  one more untimed pass, its token-forwards per answer and forwards per generated token
  (`long_answers`); for a block-causal model decoding by threshold, the same figures at the lower
  thresholds of THRESHOLD_CURVE, in the same loop (`long_answers.threshold_curve`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import GPT2Config, GPT2LMHeadModel, Trainer

from dgpt_core.config import ModelConfig
from dgpt_core.generation.options import trained_block_size
from dgpt_core.generation.sampler import SamplerConfig, TokenIds, cut_at_stop, left_pad
from dgpt_core.generation.schedules import get_schedule
from dgpt_core.models.backbone import count_parameters
from dgpt_core.training.stage import load_stage_datasets, training_rows
from dgpt_core.training.trainer import training_arguments
from eval.ppl import answer_rows, ppl_bound, text_rows

from .common import BenchSizes, Subject, alternate, counted_forwards, median_ratio
from .sample import Decoder, Outcome, decode_items, diffusion_decoder, skills_workload
from .world import bio_workload, qa_counts, qa_workload

IGNORE = -100
LONG_BATCHES = (1, 32)
"""Batch sizes of the long-answer tokens/s comparison."""
BATCH_1_ITEMS = 8
"""Prompts decoded at batch 1 (the workload's first; larger batches decode all of them)."""
COMPARED = ("ar", "ours", "ours_cache")
"""The long-answer decoders compared: AR with its KV cache, ours without and with the cache."""
THRESHOLD_CURVE = (0.7, 0.5, 0.3)
"""Thresholds (tau) of threshold decoding timed beside the measured method, with the exact cache of
a block-causal model, on the long answers: the speed a lower tau buys and the quality it costs."""


def matched_config(shape: ModelConfig, vocab_size: int, target_params: int, ids: TokenIds) -> GPT2Config:
    """GPT-2 of the same width, depth and heads; the MLP width solved so the parameter count matches."""
    h, layers = shape.hidden_size, shape.num_layers

    def config(inner: int) -> GPT2Config:
        return GPT2Config(
            vocab_size=vocab_size, n_positions=shape.max_seq_len + 1, n_embd=h, n_layer=layers,
            n_head=shape.num_heads, n_inner=inner, resid_pdrop=shape.dropout, embd_pdrop=shape.dropout,
            attn_pdrop=shape.dropout, bos_token_id=ids.eos, eos_token_id=ids.eos, pad_token_id=ids.pad,
        )

    with torch.device("meta"):
        at_4h = sum(p.numel() for p in GPT2LMHeadModel(config(4 * h)).parameters())
    per_unit = (2 * h + 1) * layers  # c_fc weight + bias and c_proj weight per inner unit and layer
    return config(max(1, 4 * h + round((target_params - at_4h) / per_unit)))


class CausalCollator:
    """Right-pads rows; labels are the tokens at eligible positions (all tokens without an
    `eligible_mask`), -100 elsewhere; the model shifts them."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.tensor(f["input_ids"], dtype=torch.long) for f in features]
        keep = [torch.tensor(f["eligible_mask"], dtype=torch.bool) if f.get("eligible_mask") is not None
                else torch.ones(len(r), dtype=torch.bool) for r, f in zip(ids, features)]
        input_ids = pad_sequence(ids, batch_first=True, padding_value=self.pad_id)
        eligible = pad_sequence(keep, batch_first=True, padding_value=False)
        attention = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in ids], batch_first=True)
        return {"input_ids": input_ids, "attention_mask": attention,
                "labels": input_ids.masked_fill(~eligible, IGNORE)}


def train_baseline(subject: Subject, out_dir: Path, budgets: dict[str, float],
                   after_stage: Callable[[str, GPT2LMHeadModel], None] | None = None,
                   ) -> tuple[GPT2LMHeadModel, dict[str, Any]]:
    """Pretraining then SFT of the matched GPT-2 on the rows the diffusion model trains on (SFT with
    the same replayed pretraining text), as the run config trains the diffusion model,
    each stage for `budgets[stage]` times its steps; `after_stage(stage, model)` sees the model
    after each stage (in eval mode, put back in train mode after)."""
    run, ids = subject.run, TokenIds.from_tokenizer(subject.tokenizer)
    target = count_parameters(subject.model)
    torch.manual_seed(run.seed)
    model = GPT2LMHeadModel(matched_config(run.model, len(subject.tokenizer), target, ids))
    info: dict[str, Any] = {"parameters": count_parameters(model), "diffusion_parameters": target,
                            "budget_fraction": budgets, "stages": {}}
    for stage in ("pretrain", "sft"):
        cfg = getattr(run, stage)
        if not cfg.enabled or not (subject.data_dir / stage).exists():
            continue
        steps = max(1, round(cfg.max_steps * budgets[stage]))
        args = training_arguments(
            cfg.model_copy(update={"max_steps": steps}), out_dir / "baseline_checkpoints" / stage,
            deepspeed=None, save_strategy="no", logging_steps=max(1, steps), disable_tqdm=True, use_cpu=True,
        )
        data = training_rows(cfg, stage, load_stage_datasets(subject.data_dir / stage), subject.data_dir / stage)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=CausalCollator(ids.pad))
        result = trainer.train()
        info["stages"][stage] = {"steps": steps, "batch": cfg.per_device_batch_size, "rows": len(data),
                                 "tokens": int(trainer.state.num_input_tokens_seen),
                                 "seconds": result.metrics["train_runtime"], "loss": result.metrics["train_loss"]}
        if after_stage is not None:
            after_stage(stage, model.eval())
            model.train()
    return model.eval(), info


@torch.inference_mode()
def causal_nll(model: GPT2LMHeadModel, rows: list[list[int]], targets: list[list[int]],
               batch_size: int = 16) -> tuple[float, int]:
    """Exact summed -log p of the target positions of each row (given everything before), and their
    count. Rows keep the positions they were trained at (GPT-2's position embeddings are absolute:
    a prepended token shifted every answer and cost the tiny baseline two orders of magnitude of
    answer perplexity), so a target at position 0, which has no context, is not scored."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = pad_sequence([torch.tensor(r) for r in chunk], batch_first=True, padding_value=0)
        attention = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in chunk], batch_first=True)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for i, t in enumerate(targets[start : start + batch_size]):
            scored[i, [p for p in t if p > 0]] = True
        logp = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        total += float(nll[scored[:, 1:]].sum())
        count += int(scored.sum())
    return total, count


def perplexities(subject: Subject, ar: GPT2LMHeadModel, sizes: BenchSizes) -> dict[str, dict[str, float]]:
    """Held-out text and held-out answers: AR exact perplexity and our ELBO bound."""
    import datasets

    run, ids = subject.run, TokenIds.from_tokenizer(subject.tokenizer)
    n = sizes.ppl_sequences
    schedule = get_schedule(run.sft.diffusion.schedule, run.eval.t_eps)
    common = {"mask_id": ids.mask, "pad_id": ids.pad, "schedule": schedule, "t_points": run.eval.ppl_t_points,
              "mask_draws": run.eval.ppl_mask_draws, "seed": 0, "batch_size": 32}
    out: dict[str, dict[str, float]] = {"ar": {}, "ours": {}}
    text = datasets.load_from_disk(str(subject.data_dir / "pretrain"))["validation"]
    seqs = [list(s) for s in text.select(range(min(n, len(text))))["input_ids"]]
    total, count = causal_nll(ar, seqs, [list(range(len(s))) for s in seqs])
    out["ar"]["ppl"] = math.exp(total / count)
    out["ours"]["ppl"] = ppl_bound(subject.model, text_rows(seqs), **common)["value"]
    sft = datasets.load_from_disk(str(subject.data_dir / "sft"))["validation"]
    part = sft.select(range(min(n, len(sft))))
    rows, counts = answer_rows(list(zip(part["input_ids"], part["eligible_mask"])), ids.im_end)
    if rows:
        total, count = causal_nll(ar, [r.ids for r in rows], [r.targets[:c] for r, c in zip(rows, counts)])
        out["ar"]["answer_ppl"] = math.exp(total / count)
        out["ours"]["answer_ppl"] = ppl_bound(subject.model, rows, norm_tokens=counts, **common)["value"]
    return out


def ar_decoder(ar: GPT2LMHeadModel, ids: TokenIds, canvas: int) -> Decoder:
    """Greedy generation of up to `canvas` tokens with the KV cache, stopping at our stop tokens;
    NFE = generated positions (one forward each)."""
    stops = list(SamplerConfig().stop_ids(ids))

    @torch.inference_mode()
    def decode(batch: list[list[int]]) -> tuple[list[list[int]], list[bool], float]:
        prompt_ids, mask = left_pad(batch, ids.pad)
        out = ar.generate(input_ids=prompt_ids, attention_mask=mask, max_new_tokens=canvas, do_sample=False,
                          eos_token_id=stops, pad_token_id=ids.pad, use_cache=True)
        new = out[:, prompt_ids.shape[1] :]
        answers, stopped = cut_at_stop(new, stops)
        return answers, stopped, new.shape[1]

    return decode


def describe(cfg: SamplerConfig) -> str:
    """A sampler config in words, e.g. `threshold (tau 0.9), at most 32 steps per block of 32,
    prefix cache, greedy`."""
    name = {"random": "ancestral", "threshold": f"threshold (tau {cfg.threshold:g})",
            "eb": f"eb (gamma {cfg.eb_gamma:g})"}.get(cfg.strategy, cfg.strategy)
    steps = f"{'at most ' if cfg.rule.commit != 'count' else ''}{cfg.steps} steps"
    steps += f" per block of {cfg.block_size}" if cfg.block_size else ""
    steps += f" in {cfg.canvas_blocks} windows" if cfg.canvas_blocks > 1 else ""
    extras = [text for text, on in (("prefix cache", cfg.prefix_cache),
                                    (f"no repeated {cfg.no_repeat_ngram_size}-grams", cfg.no_repeat_ngram_size > 0),
                                    (f"remask {cfg.remask}", cfg.remask != "off"), ("editing", cfg.edit)) if on]
    temperature = "greedy" if cfg.temperature == 0 else f"temperature {cfg.temperature:g}"
    return ", ".join([name, steps, *extras, temperature])


def quality(outcome: Outcome) -> dict[str, float]:
    """The scores, loop rate and NFE per call of one decoding run."""
    return {**outcome.scores, "loop_rate": outcome.loop_rate, "nfe": outcome.nfe}


def long_answer_speed(subject: Subject, sizes: BenchSizes, ar: GPT2LMHeadModel, fast: SamplerConfig) -> dict[str, Any]:
    """AR greedy generation with the KV cache vs ours (`fast` without, then with the prefix cache)
    on the long-answer workload (the world's biography requests, else the skills items), at each
    batch size of LONG_BATCHES, all timed in one alternating loop. Batch 1 decodes the first
    BATCH_1_ITEMS prompts, larger batches all of them; the quality is that of the largest batch."""
    workload = bio_workload(subject, sizes) if subject.world is not None else skills_workload(subject, sizes)
    canvas, ids = workload.canvas, TokenIds.from_tokenizer(subject.tokenizer)
    plain = workload.sampler(fast.replace(prefix_cache=False))
    decoders = {"ar": ar_decoder(ar, ids, canvas), "ours": diffusion_decoder(subject.model, ids, plain),
                "ours_cache": diffusion_decoder(subject.model, ids, plain.replace(prefix_cache=True))}
    block = trained_block_size(subject.model)
    curve = {f"tau_{tau:g}": plain.replace(prefix_cache=True, threshold=tau) for tau in THRESHOLD_CURVE
             if plain.strategy == "threshold" and block and tau != plain.threshold}
    decoders.update({key: diffusion_decoder(subject.model, ids, cfg) for key, cfg in curve.items()})
    items = {batch: workload if batch > 1 else dataclasses.replace(workload, prompts=workload.prompts[:BATCH_1_ITEMS])
             for batch in LONG_BATCHES}
    outcomes: dict[str, Outcome] = {}

    def runner(key: str, batch: int) -> Callable[[], None]:
        def run() -> None:
            outcomes[f"{key}/{batch}"] = decode_items(items[batch], batch, decoders[key], subject.tokenizer)

        return run

    runs = {f"{k}/{b}": runner(k, b) for b in LONG_BATCHES for k in decoders}
    seconds = alternate(runs, sizes.reps)
    models = {key: ar if key == "ar" else subject.model for key in decoders}
    costs: dict[str, dict[str, dict[str, float]]] = {key: {} for key in decoders}
    for name, run in runs.items():  # counted once more, untimed
        key, batch = name.split("/")
        with counted_forwards(models[key]) as counts:
            run()
        costs[key][f"batch_{batch}"] = {
            "token_forwards_per_answer": counts["token_forwards"] / len(items[int(batch)].prompts),
            "forwards_per_token": counts["forwards"] / max(outcomes[name].tokens, 1)}
    tps = {name: [outcomes[name].tokens / s for s in times] for name, times in seconds.items()}
    largest = max(LONG_BATCHES)
    out: dict[str, Any] = {key: {f"batch_{b}": statistics.median(tps[f"{key}/{b}"]) for b in LONG_BATCHES}
                           for key in COMPARED}
    vs_ar = {key: {f"batch_{b}": median_ratio(tps[f"{key}/{b}"], tps[f"ar/{b}"]) for b in LONG_BATCHES}
             for key in decoders if key != "ar"}
    for key in ("ours", "ours_cache"):
        out[f"{key}_vs_ar"] = vs_ar[key]
    out["long_answers"] = {
        "workload": workload.name, "canvas": canvas,
        "items": {f"batch_{b}": len(items[b].prompts) for b in LONG_BATCHES},
        "method": describe(plain), "quality_keys": list(workload.quality_keys),
        "block_size": block,
        **{key: {**quality(outcomes[f"{key}/{largest}"]), "cost": costs[key]} for key in COMPARED},
        "threshold_curve": [
            {"threshold": cfg.threshold, **quality(outcomes[f"{key}/{largest}"]), "cost": costs[key],
             "vs_ar_tokens_per_s": vs_ar[key]}
            for key, cfg in [("ours_cache", plain), *curve.items()]] if curve else [],
    }
    return out


def baseline_suite(subject: Subject, sizes: BenchSizes, out_dir: Path, fast: SamplerConfig) -> dict[str, Any]:
    """Train the matched GPT-2, then compare with ours (`fast`, our best fast decoding method as the
    sample suite chose it; its `max_new_tokens` is set to each workload's canvas): perplexities;
    greedy short answers (quality only) on the world's reversed and attribute questions of
    held-out people when the run's SFT data is the world (the reversal curse), else on the skills
    test items; and the tokens/s and quality of long answers (`long_answer_speed`)."""
    ar, info = train_baseline(subject, out_dir, dict.fromkeys(("pretrain", "sft"), sizes.baseline_budget))
    ppl = perplexities(subject, ar, sizes)
    workload = qa_workload(subject, sizes) if subject.world is not None else skills_workload(subject, sizes)
    ids = TokenIds.from_tokenizer(subject.tokenizer)
    ours_cfg = workload.sampler(fast.replace(prefix_cache=False))
    short = {"ar": decode_items(workload, sizes.batch_size, ar_decoder(ar, ids, workload.canvas), subject.tokenizer),
             "ours": decode_items(workload, sizes.batch_size, diffusion_decoder(subject.model, ids, ours_cfg),
                                  subject.tokenizer)}
    speed = long_answer_speed(subject, sizes, ar, fast)
    summary: dict[str, Any] = {"workload": workload.name, "quality_keys": list(workload.quality_keys)}
    for key in ("ar", "ours"):
        summary[key] = {**ppl[key], **quality(short[key]), "tokens_per_s": speed[key]}
    summary["ar"].update({"parameters": info["parameters"], "training": info})
    summary["ours"].update({"parameters": info["diffusion_parameters"], "method": describe(ours_cfg),
                            "ppl_is_upper_bound": True})
    summary["ours_cache"] = {"method": describe(ours_cfg.replace(prefix_cache=True)),
                             "tokens_per_s": speed["ours_cache"]}
    summary["ours_vs_ar_tokens_per_s"] = speed["ours_vs_ar"]
    summary["ours_cache_vs_ar_tokens_per_s"] = speed["ours_cache_vs_ar"]
    summary["long_answers"] = speed["long_answers"]
    if subject.world is not None:
        summary["world_items"] = qa_counts(subject, sizes)
        summary["reversal_ours_minus_ar"] = (summary["ours"]["reversal_exact_match"]
                                             - summary["ar"]["reversal_exact_match"])
    return summary
