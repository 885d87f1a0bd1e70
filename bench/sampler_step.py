"""Time one denoising step of the sampler, split into model forward vs everything else.

    python -m bench.sampler_step                    # hidden 64, 2 layers, vocab 4096, canvas 64, batch 8
    python -m bench.sampler_step --vocab 50304 --edit

Random tiny ModernBERT, random prompts; the forward time is measured around the sampler's model
call (backbone, plus the vocabulary projection at the positions drawn), the rest (drawing, scoring, selection, bookkeeping) is total minus forward. Per strategy the
fastest of --repeats runs is reported (the machine may be shared).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import dgpt_core.generation.sampler as sampling
from bench.common import random_model, random_tokens, synthetic_tokenizer
from dgpt_core.config import ModelConfig
from dgpt_core.generation.ops import draw
from dgpt_core.generation.sampler import SamplerConfig, TokenIds, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--edit", action="store_true")
    parser.add_argument("--strategies", nargs="+", default=["random", "confidence", "entropy"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = synthetic_tokenizer(args.vocab)
    ids = TokenIds.from_tokenizer(tokenizer)
    shape = ModelConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_layers=args.layers,
                        num_heads=max(1, args.hidden // 32), max_seq_len=args.prompt_len + args.canvas,
                        global_attn_every_n_layers=1, attn_implementation="sdpa")
    model = random_model(shape, tokenizer).eval()
    prompts = random_tokens(tokenizer, (args.batch, args.prompt_len))

    forward_s = 0.0
    model_call = sampling._Forward.__call__

    def timed_model_call(*a: object) -> torch.Tensor:
        nonlocal forward_s
        start = time.perf_counter()
        logits = model_call(*a)
        forward_s += time.perf_counter() - start
        return logits

    sampling._Forward.__call__ = timed_model_call
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch}, "
        f"prompt {args.prompt_len}, canvas {args.canvas}, {args.steps} steps, edit={args.edit}, "
        f"threads {args.threads}, torch {torch.__version__}"
    )
    print(f"{'strategy':<12}{'ms/step':>9}{'forward':>9}{'other':>9}{'other %':>9}{'nfe':>6}")
    for strategy in args.strategies:
        cfg = SamplerConfig(
            strategy=strategy, steps=args.steps, max_new_tokens=args.canvas, edit=args.edit, stop_token_ids=()
        )
        generate(model, prompts, ids, cfg, seed=0)  # warm-up
        runs = []  # (total, forward, nfe) per run; the fastest run is the least disturbed by other load
        for seed in range(args.repeats):
            forward_s = 0.0
            start = time.perf_counter()
            nfe = generate(model, prompts, ids, cfg, seed=seed).nfe
            runs.append((time.perf_counter() - start, forward_s, nfe))
        total_s, fwd_s, nfe = min(runs)
        total, forward = 1e3 * total_s / args.steps, 1e3 * fwd_s / args.steps
        print(
            f"{strategy:<12}{total:>9.2f}{forward:>9.2f}{total - forward:>9.2f}"
            f"{100 * (total - forward) / total:>8.0f}%{nfe:>6}"
        )

    # reference: the original's draw, torch.distributions.Categorical over every canvas position
    logits = torch.randn(args.batch, args.canvas, args.vocab)
    gen = torch.Generator().manual_seed(0)
    best = min(
        _timed(lambda: torch.distributions.Categorical(logits=logits).sample()) for _ in range(args.repeats)
    )
    ours = min(
        _timed(lambda: draw(logits.flatten(0, 1), 1.0, 1.0, gen)) for _ in range(args.repeats)
    )
    print(
        f"draw for all {args.batch}x{args.canvas} positions: Categorical {1e3 * best:.2f} ms, "
        f"this sampler's float64 inverse-CDF {1e3 * ours:.2f} ms (it draws only where the canvas can change)"
    )


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
