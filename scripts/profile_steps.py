"""torch.profiler tables of the two hot paths at a given vocabulary, random weights of a preset's shape:
a confidence sampler run (batch 8, prompt 16, canvas 64, 32 steps) and one edit-stage diffusion
training step (the preset's pretraining batch and length).

    python scripts/profile_steps.py [--preset tiny] [--vocab 50257] [--rows 12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import random_model, random_tokens, synthetic_tokenizer  # noqa: E402
from dgpt_core.collator import DiffusionCollator  # noqa: E402
from dgpt_core.loss import diffusion_loss  # noqa: E402
from dgpt_core.run_config import load_run_config  # noqa: E402
from dgpt_core.sampling import SamplerConfig, TokenIds, generate  # noqa: E402
from dgpt_core.tokenizer import special_token_ids  # noqa: E402


def table(title: str, fn, rows: int) -> None:
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"=== {title}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    run = load_run_config(args.preset, [])
    tokenizer = synthetic_tokenizer(args.vocab)

    sampler_model = random_model(run.model, tokenizer, max_seq_len=80).eval()
    ids = TokenIds.from_tokenizer(tokenizer)
    prompts = random_tokens(tokenizer, (8, 16))
    cfg = SamplerConfig(strategy="confidence", steps=32, max_new_tokens=64, stop_token_ids=(), seed=0)
    table(f"sampler, confidence, vocab {args.vocab}", lambda: generate(sampler_model, prompts, ids, cfg), args.rows)

    model = random_model(run.model, tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, length = run.pretrain.per_device_batch_size, run.model.max_seq_len
    features = [{"input_ids": r} for r in random_tokens(tokenizer, (batch, length)).tolist()]
    collator = DiffusionCollator.from_tokenizer(run.pretrain.diffusion, tokenizer, length)
    collator.set_progress(1.0)
    mask_id = special_token_ids(tokenizer)["mask"]

    def step() -> None:
        diffusion_loss(model, collator(features), mask_id=mask_id).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    table(f"diffusion training step, edit stage, vocab {args.vocab} ({batch} x {length})", step, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
