"""torch.profiler tables of the two hot paths at a given vocabulary, random weights of a preset's shape:
a confidence sampler run (batch 8, prompt 16, canvas 64, 32 steps), the replay of its model forwards
alone and the difference per op (the sampler overhead of `dgpt bench`), and one edit-stage diffusion
training step (the preset's pretraining batch and length).

    python -m bench.profile_steps [--preset tiny] [--vocab 50257] [--rows 12]
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import random_model, random_tokens, synthetic_tokenizer
from bench.sample import recorded_draws, replay_forwards
from dgpt_core.config import load_run_config
from dgpt_core.diffusion.collator import DiffusionCollator
from dgpt_core.diffusion.loss import diffusion_loss
from dgpt_core.generation.sampler import SamplerConfig, TokenIds, generate
from dgpt_core.models.tokenizer import special_token_ids


def table(title: str, fn, rows: int) -> dict[str, float]:
    """Print the op table of one profiled call of `fn` (after a warm-up); return self ms per op."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    averages = prof.key_averages()
    print(f"=== {title}")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))
    return {event.key: event.self_cpu_time_total / 1e3 for event in averages}


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
    run_sampler = functools.partial(generate, sampler_model, prompts, ids, cfg)
    sampler_ops = table(f"sampler, confidence, vocab {args.vocab}", run_sampler, args.rows)
    with recorded_draws() as calls:
        run_sampler()
    replay_ops = table("its model forwards alone (bench.sample.replay_forwards)",
                       functools.partial(replay_forwards, sampler_model, calls), args.rows)
    overhead = {name: sampler_ops.get(name, 0.0) - replay_ops.get(name, 0.0) for name in {*sampler_ops, *replay_ops}}
    forward_ms = sum(replay_ops.values())
    print(f"=== sampler overhead by op (sampler self time - replay self time; forwards {forward_ms:.0f} ms, "
          f"overhead {sum(overhead.values()):.0f} ms)")
    for name, ms in sorted(overhead.items(), key=lambda kv: -abs(kv[1]))[: args.rows]:
        print(f"{ms:9.1f} ms  {name}")

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
