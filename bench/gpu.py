"""GPU benchmark, one command: bf16 diffusion training throughput and MFU of a ModernBERT-base-sized
model under DeepSpeed ZeRO-2 on one GPU (sdpa attention), its step time against a plain masked-LM
step, then sampler tokens/s at batch 1 and 64 against a GPT-2 of the same parameter count
generating with its KV cache.

    python -m bench.gpu OUT_DIR                 # a few minutes on an H100 / H200
    python -m bench.gpu OUT_DIR --smoke         # CPU, tiny sizes: exercises every code path

Writes OUT_DIR/bench_gpu.json (also printed) and OUT_DIR/train_profile.txt (torch.profiler table of
three more diffusion steps; bench_gpu.json gives the GPU-busy share of their wall time and the
peak memory of those steps). Model: hidden 768, 22 layers, 12 heads, GLU width 1152, vocab 50368,
global attention in every layer, sequence 1024, random weights, random tokens (every position
eligible, as in pretraining). Training step: our collator (on the CPU, inside the timed loop),
`diffusion_loss` (logits only at the scored positions), engine backward and step; alternating with
it on the same engine, a masked-LM step (transformers' 15 % collator, the model's own loss on
logits at every position): `diffusion_vs_mlm_throughput` = median of MLM step s / diffusion step s.

Sampling (`sample`: batch `sample_batch`, `sample_batch_1`: batch 1): random prompts of `prompt`
tokens, `canvas` new tokens, no stop tokens, greedy; our sampler settings (random weights keep
every confidence far below the threshold, so each runs its step cap: canvas / 4 forwards, or 16
per block of 64; the tokens/s assume that NFE), and `ar_kv_cache`: the GPT-2 of
bench.baseline.matched_config (same width, depth, heads and parameter count) generating exactly
`canvas` tokens with transformers' `generate` and its KV cache; `ours_vs_ar_tokens_per_s` per
setting.

MFU = model FLOPs per second / the GPU's dense bf16 peak (H100 / H200 SXM: 989 TFLOP/s; pass
--peak-tflops otherwise). Model FLOPs per step = 6 * dense parameters * tokens (every linear
layer of the layers) + 12 * seq * hidden * layers * tokens (attention scores and values, forward
and backward) + 6 * (hidden^2 + hidden * vocab) * scored positions (the MLM head and decoder run
on the scored positions alone).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
FULL = {"hidden": 768, "layers": 22, "heads": 12, "intermediate": 1152, "vocab": 50368, "seq": 1024,
        "batch": 16, "warmup": 5, "steps": 30, "sample_batch": 64, "prompt": 64, "canvas": 256}
SMOKE = {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128, "vocab": 1024, "seq": 128,
         "batch": 2, "warmup": 1, "steps": 2, "sample_batch": 2, "prompt": 16, "canvas": 32}


def shape_of(size: dict[str, int]) -> Any:
    """The ModelConfig of the given size, sdpa attention, global attention in every layer."""
    from dgpt_core.config import ModelConfig

    return ModelConfig(hidden_size=size["hidden"], num_layers=size["layers"], num_heads=size["heads"],
                       intermediate_size=size["intermediate"], max_seq_len=size["seq"],
                       attn_implementation="sdpa", global_attn_every_n_layers=1)


def build(size: dict[str, int]) -> tuple[Any, Any]:
    """(tokenizer, random ModernBertForMaskedLM) of the given size."""
    from bench.common import random_model, synthetic_tokenizer

    tokenizer = synthetic_tokenizer(size["vocab"])
    return tokenizer, random_model(shape_of(size), tokenizer)


def model_flops(model: Any, size: dict[str, int], tokens: int, scored: int) -> float:
    """Training FLOPs of one step (see the module docstring)."""
    layers = model.model.layers
    dense = sum(p.numel() for p in layers.parameters() if p.dim() == 2)
    h, v = size["hidden"], size["vocab"]
    return 6.0 * dense * tokens + 12.0 * size["seq"] * h * size["layers"] * tokens + 6.0 * (h * h + h * v) * scored


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, "given"
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return tflops * 1e12, name
    return None, name


def make_engine(model: torch.nn.Module, batch: int, bf16: bool) -> tuple[Any, bool]:
    """A DeepSpeed ZeRO-2 engine (one process) around model and a torch AdamW, or, without DeepSpeed,
    the bare model and optimizer (what ZeRO-2 amounts to on one GPU); returns (engine, is_deepspeed)."""
    from dgpt_core.training.stage import single_process_env

    os.environ.update(single_process_env())
    fused = torch.cuda.is_available()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=fused)
    try:
        import deepspeed
    except ImportError:
        return _Plain(model.to(torch.bfloat16 if bf16 else torch.float32), optimizer), False
    config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, True


class _Plain:
    """The engine interface used here (module, backward, step) for a model without DeepSpeed."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(run_step: Any, device: torch.device, table_path: Path, steps: int = 3) -> dict[str, Any]:
    """torch.profiler over a few more training steps: the op table (by GPU time on a GPU) goes to
    `table_path`; returns the GPU-busy share of the profiled wall time (kernel time summed over
    the steps; the profiler's own overhead lowers it a little), which tells host-bound steps
    (a GPU waiting on Python, DeepSpeed or the collator) from kernel-bound ones."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for step in range(steps):
            run_step(10_000 + step)
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(averages.table(sort_by=sort_by, row_limit=40, max_name_column_width=70) + "\n")
    busy = sum(event.self_device_time_total for event in averages) / 1e6 if cuda else None
    return {"steps": steps, "wall_s": wall, "gpu_busy_s": busy, "gpu_busy_share": None if busy is None else busy / wall,
            "table": table_path.name}


def train_bench(size: dict[str, int], device: torch.device, bf16: bool, peak: float | None,
                out_dir: Path) -> dict[str, Any]:
    from transformers import DataCollatorForLanguageModeling

    from bench.common import random_tokens
    from dgpt_core.config import DiffusionConfig
    from dgpt_core.diffusion.collator import DiffusionCollator
    from dgpt_core.diffusion.loss import diffusion_loss
    from dgpt_core.models.tokenizer import special_token_ids

    tokenizer, model = build(size)
    model.to(device).train()
    engine, is_deepspeed = make_engine(model, size["batch"], bf16)
    collator = DiffusionCollator.from_tokenizer(DiffusionConfig(edit_start=1.0), tokenizer, size["seq"])
    mlm_collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    mask_id = special_token_ids(tokenizer)["mask"]

    def run_step(step: int) -> tuple[float, float, int]:
        """One timed training step: (seconds, collator seconds, scored positions)."""
        rows = random_tokens(tokenizer, (size["batch"], size["seq"]), seed=step).tolist()
        sync(device)
        start = time.perf_counter()
        batch = collator([{"input_ids": r} for r in rows])
        collated = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = diffusion_loss(engine.module, batch, mask_id=mask_id).total
        engine.backward(loss)
        engine.step()
        sync(device)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}")
        return time.perf_counter() - start, collated - start, int((batch["masked_positions"] | batch["edit_positions"]).sum())

    def mlm_step(step: int) -> float:
        """One timed masked-LM step on the same rows: seconds."""
        rows = random_tokens(tokenizer, (size["batch"], size["seq"]), seed=step).tolist()
        sync(device)
        start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in mlm_collator([{"input_ids": r} for r in rows]).items()}
        loss = engine.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss
        engine.backward(loss)
        engine.step()
        sync(device)
        return time.perf_counter() - start

    step_s, collate_s, scored_counts, mlm_s = [], [], [], []
    for step in range(size["warmup"] + size["steps"]):
        seconds, collate, scored = run_step(step)
        mlm = mlm_step(step)
        if step >= size["warmup"]:
            step_s.append(seconds)
            collate_s.append(collate)
            scored_counts.append(scored)
            mlm_s.append(mlm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak of diffusion steps alone, from here
    profile = profile_steps(run_step, device, out_dir / "train_profile.txt")
    tokens = size["batch"] * size["seq"]
    seconds = statistics.median(step_s)
    flops = model_flops(engine.module, size, tokens, int(statistics.median(scored_counts)))
    out = {
        "deepspeed_zero2": is_deepspeed,
        "bf16": bf16,
        "parameters": sum(p.numel() for p in engine.module.parameters()),
        "batch": size["batch"],
        "seq_len": size["seq"],
        "step_s_median": seconds,
        "tokens_per_s": tokens / seconds,
        "collator_share": statistics.median(c / s for c, s in zip(collate_s, step_s)),
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": None if peak is None else flops / seconds / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "mlm_step_s_median": statistics.median(mlm_s),
        "mlm_tokens_per_s": tokens / statistics.median(mlm_s),
        "diffusion_vs_mlm_throughput": statistics.median(m / d for m, d in zip(mlm_s, step_s)),
        "profile": profile,
    }
    return out


def median_seconds(run: Callable[[], int], device: torch.device, reps: int = 3) -> tuple[float, int]:
    """(median seconds, forward passes) of `run()` (which returns its forward passes) after a warm-up."""
    run()
    times, nfe = [], 0
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        nfe = run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), nfe


@torch.inference_mode()
def sample_bench(size: dict[str, int], device: torch.device, bf16: bool, batch: int) -> dict[str, Any]:
    """Tokens/s of our sampler settings and of the matched GPT-2 with its KV cache at `batch`."""
    from transformers import GPT2LMHeadModel

    from bench.baseline import matched_config
    from bench.common import random_tokens
    from dgpt_core.generation.sampler import SamplerConfig, TokenIds, generate

    dtype = torch.bfloat16 if bf16 else torch.float32
    length = size["prompt"] + size["canvas"]
    tokenizer, model = build({**size, "seq": length})
    model.to(device=device, dtype=dtype).eval()
    ids = TokenIds.from_tokenizer(tokenizer)
    prompts = random_tokens(tokenizer, (batch, size["prompt"])).to(device)
    steps = size["canvas"] // 4
    configs = {
        "confidence": SamplerConfig(strategy="confidence", steps=steps, max_new_tokens=size["canvas"]),
        "threshold": SamplerConfig(strategy="threshold", steps=steps, max_new_tokens=size["canvas"]),
        "threshold_block64": SamplerConfig(strategy="threshold", steps=16, block_size=64, max_new_tokens=size["canvas"]),
        "threshold_block64_cache": SamplerConfig(strategy="threshold", steps=16, block_size=64,
                                                 max_new_tokens=size["canvas"], prefix_cache=True),
    }
    ours = sum(p.numel() for p in model.parameters())
    ar = GPT2LMHeadModel(matched_config(shape_of({**size, "seq": length}), size["vocab"], ours, ids))
    ar.to(device=device, dtype=dtype).eval()
    out: dict[str, Any] = {"batch": batch, "prompt": size["prompt"], "canvas": size["canvas"],
                           "parameters": ours, "ar_parameters": sum(p.numel() for p in ar.parameters())}

    def ours_run(cfg: SamplerConfig) -> Callable[[], int]:
        return lambda: generate(model, prompts, ids, cfg.replace(stop_token_ids=(), temperature=0.0, seed=0)).nfe

    def ar_run() -> int:
        new = ar.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=size["canvas"],
                          min_new_tokens=size["canvas"], do_sample=False, use_cache=True, pad_token_id=ids.pad)
        return new.shape[1] - prompts.shape[1]  # one forward per new token

    runs = {**{name: ours_run(cfg) for name, cfg in configs.items()}, "ar_kv_cache": ar_run}
    for name, run in runs.items():
        seconds, nfe = median_seconds(run, device)
        out[name] = {"nfe": nfe, "seconds": seconds, "tokens_per_s": batch * size["canvas"] / seconds,
                     "ms_per_step": 1000 * seconds / nfe}
    out["ours_vs_ar_tokens_per_s"] = {name: out[name]["tokens_per_s"] / out["ar_kv_cache"]["tokens_per_s"]
                                      for name in configs}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (code-path check)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 30)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    args = parser.parse_args()
    size = dict(SMOKE if args.smoke else FULL)
    size.update({k: v for k, v in {"batch": args.batch, "steps": args.steps}.items() if v is not None})
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        parser.error("no GPU visible: run with --smoke for the CPU code-path check")
    bf16 = True
    peak, gpu = peak_flops(device, args.peak_tflops)
    started = time.perf_counter()
    result: dict[str, Any] = {"device": gpu, "smoke": args.smoke, "torch": torch.__version__, "size": size,
                              "peak_tflops": None if peak is None else peak / 1e12}
    out = Path(args.out_dir)
    result["train"] = train_bench(size, device, bf16, peak, out)
    gc.collect()  # the DeepSpeed engine holds reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["sample"] = sample_bench(size, device, bf16, size["sample_batch"])
    result["sample_batch_1"] = sample_bench(size, device, bf16, 1)
    result["seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
