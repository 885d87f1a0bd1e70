"""Training-step overhead: our diffusion step against a plain masked-LM step.

Both run on the same ModernBERT (the preset's shape), the same batch of token rows (batch size
and length of the preset's pretraining stage) and the same AdamW, in one process, alternating:

- diffusion: `DiffusionCollator` -> `diffusion_loss` -> backward -> step, in the masking stage
  (`masking`: progress 0) and, when the stage has one, in the edit stage (`edit`: progress 1, edit
  corruption and the edit loss on visible tokens); the headline figures are the worse stage's;
- masked LM: transformers' `DataCollatorForLanguageModeling` (15 %) -> the model's own loss on
  `labels` -> backward -> step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling

from dgpt_core.config import RunConfig
from dgpt_core.diffusion.collator import DiffusionCollator
from dgpt_core.diffusion.loss import diffusion_loss
from dgpt_core.models.tokenizer import special_token_ids

from .common import BenchSizes, alternate, median_ratio, random_model, random_tokens, synthetic_tokenizer


def compare_steps(run: RunConfig, vocab_size: int, sizes: BenchSizes) -> dict[str, Any]:
    """Tokens/s ratio (diffusion / masked LM) and the collator's share of the diffusion step."""
    tokenizer = synthetic_tokenizer(vocab_size)
    model = random_model(run.model, tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stage = run.pretrain
    batch, length = stage.per_device_batch_size, run.model.max_seq_len
    features = [{"input_ids": row} for row in random_tokens(tokenizer, (batch, length)).tolist()]

    mask_id = special_token_ids(tokenizer)["mask"]
    mlm_collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    collate_s: dict[str, list[float]] = {"masking": [], "edit": []}

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def diffusion_step(kind: str) -> Callable[[], None]:
        collator = DiffusionCollator.from_tokenizer(stage.diffusion, tokenizer, length)
        collator.set_progress(0.0 if kind == "masking" else 1.0)

        def step() -> None:
            start = time.perf_counter()
            inputs = collator(features)
            collate_s[kind].append(time.perf_counter() - start)
            parts = diffusion_loss(model, inputs, mask_id=mask_id, normalization=stage.diffusion.loss_normalization,
                                   edit_loss_weight=stage.diffusion.edit_loss_weight)
            update(parts.total)

        return step

    def mlm_step() -> None:
        inputs = mlm_collator(features)
        update(model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     labels=inputs["labels"]).loss)

    def repeat(step: Callable[[], None]) -> Callable[[], None]:
        return lambda: [step() for _ in range(sizes.train_steps)]

    kinds = ("masking", "edit") if stage.diffusion.edit_start < 1.0 else ("masking",)
    steps = {kind: repeat(diffusion_step(kind)) for kind in kinds}
    seconds = alternate({**steps, "mlm": repeat(mlm_step)}, sizes.reps)
    tokens = batch * length * sizes.train_steps
    out: dict[str, Any] = {"vocab_size": vocab_size, "batch": batch, "seq_len": length,
                           "mlm_tokens_per_s": tokens / statistics.median(seconds["mlm"])}
    for kind in kinds:
        collate = collate_s[kind][-sizes.reps * sizes.train_steps :]  # the timed repetitions (no warm-up)
        per_rep = [sum(collate[i : i + sizes.train_steps]) for i in range(0, len(collate), sizes.train_steps)]
        out[kind] = {
            "diffusion_tokens_per_s": tokens / statistics.median(seconds[kind]),
            "diffusion_vs_mlm_throughput": median_ratio(seconds["mlm"], seconds[kind]),
            "collator_share": median_ratio(per_rep, seconds[kind]),
        }
    worst = min(kinds, key=lambda k: out[k]["diffusion_vs_mlm_throughput"])
    out.update({"diffusion_vs_mlm_throughput": out[worst]["diffusion_vs_mlm_throughput"],
                "collator_share": max(out[k]["collator_share"] for k in kinds), "worst_stage": worst})
    return out


def train_suite(run: RunConfig, model_vocab: int, sizes: BenchSizes) -> dict[str, Any]:
    """`diffusion_vs_mlm_throughput` and `collator_share` at the model's vocabulary (top level)
    and per vocabulary size (`by_vocab`)."""
    vocabs = list(dict.fromkeys((model_vocab, *sizes.train_vocabs)))
    by_vocab = {str(v): compare_steps(run, v, sizes) for v in vocabs}
    own = by_vocab[str(model_vocab)]
    return {
        "diffusion_vs_mlm_throughput": own["diffusion_vs_mlm_throughput"],
        "collator_share": own["collator_share"],
        "by_vocab": by_vocab,
    }
