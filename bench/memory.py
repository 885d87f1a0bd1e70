"""Peak memory and step time of one SFT-like training step (the diffusion loss forward + backward +
an AdamW step) per model shape, with and without gradient checkpointing (issue 31).

    python -m bench.memory [--shapes tiny fineweb] [--fineweb-layers 2] [--fineweb-batch 2]
        [--fineweb-seq-len 512] [--steps 1] [--device cpu|cuda] [--json PATH]

Shapes are the presets' `model` sections at their SFT stage's diffusion settings (block size, edit
corruption on, loss normalisation) and batch, on a random model with a synthetic tokenizer of the
preset's vocabulary size, rows of random tokens (the first quarter a prompt that is not scored).
`fineweb` (20 layers, hidden 1280, batch 8, 2048 tokens) is scaled to `--fineweb-layers`,
`--fineweb-batch` and `--fineweb-seq-len` so that it runs on a CPU in seconds (0 keeps the
preset's value); its rows say so. fp32 throughout (the presets' bf16 is not applied).

Each (shape, tuning, checkpointing) case runs in a fresh Python process (one warm-up step, then
`--steps` measured steps), so no case inherits another's memory. Per case:
- `step_s`: median seconds of a measured step; `tokens_per_s`: real (non-padding) row tokens per
  second of it;
- `saved_activations_mb`: bytes of the tensors autograd saves for the backward during one forward
  (a `saved_tensors_hooks` pack hook, each storage counted once, parameters left out). Inside a
  checkpointed layer torch's own hooks replace it, so this is the activation memory checkpointing
  removes; the layer inputs the checkpoints keep are not in it;
- `forward_held_mb` (CUDA only): the bytes the forward leaves allocated until the backward,
  checkpoint-kept layer inputs included (on the CPU the resident set size cannot show it: the
  allocator reuses what the warm-up step freed);
- `peak_rss_over_model_mb`: the process's peak resident set size over the steps
  (`dgpt_core.training.memory.PeakMemory`) minus its size once the model and batch were built:
  gradients, AdamW state and the activations (`grads_adamw_mb`: the fp32 gradients and AdamW's two
  moments of the trained parameters, 12 bytes each, for comparison);
- `gpu_peak_allocated_mb` (CUDA only): torch's peak allocated memory over the measured steps.

`tuning` is the set of trained parameters: `full` (every parameter) or `lora` (a rank-8 LoRA
adapter on the attention and MLP projections, `dgpt_core.models.adapters`, the base frozen); the
optimizer takes the parameters that require grad, so LoRA's rows show the gradient and AdamW
memory it saves (`trained_params_m`, `grads_adamw_mb`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import torch

from dgpt_core.config import load_run_config
from dgpt_core.config.adapter import AdapterConfig
from dgpt_core.diffusion.collator import DiffusionCollator
from dgpt_core.diffusion.loss import diffusion_loss
from dgpt_core.markdown import markdown_table, significant
from dgpt_core.models.adapters import attach_adapter
from dgpt_core.models.backbone import count_parameters, unwrap
from dgpt_core.models.tokenizer import special_token_ids
from dgpt_core.training.memory import MIB, PeakMemory
from dgpt_core.training.trainer import CHECKPOINTING_ARGUMENT

from .common import LARGE_VOCAB, random_model, random_tokens, synthetic_tokenizer

TUNINGS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "full": lambda model: model,
    "lora": lambda model: attach_adapter(model, AdapterConfig(method="lora")),
}
"""Tuning name -> the model the optimizer trains (the model itself, or it with an adapter)."""

COLUMNS = ["shape", "tuning", "checkpointing", "params_m", "trained_params_m", "batch x tokens", "step_s", "tokens_per_s",
           "saved_activations_mb", "forward_held_mb", "grads_adamw_mb", "peak_rss_over_model_mb",
           "gpu_peak_allocated_mb"]


def enable_checkpointing(model: torch.nn.Module) -> None:
    """transformers' per-layer checkpointing, non-reentrant, as the Trainer turns it on for
    `TrainingConfig.gradient_checkpointing` (under the method name this transformers has)."""
    enable = getattr(model, f"{CHECKPOINTING_ARGUMENT}_enable")
    enable(**{f"{CHECKPOINTING_ARGUMENT}_kwargs": {"use_reentrant": False}})


@contextlib.contextmanager
def saved_tensor_bytes(model: torch.nn.Module) -> Iterator[list[int]]:
    """While open, the bytes of the storages autograd saves for the backward ([total]), each
    storage once and the model's parameters not at all."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total


def shape_of(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    """The case's model and batch: the preset's, `fineweb` scaled by the command line."""
    run = load_run_config(shape)
    layers, batch, seq_len = run.model.num_layers, run.sft.per_device_batch_size, run.model.max_seq_len
    if shape == "fineweb":
        layers = args.fineweb_layers or layers
        batch = args.fineweb_batch or batch
        seq_len = args.fineweb_seq_len or seq_len
    scaled = (layers, batch, seq_len) != (run.model.num_layers, run.sft.per_device_batch_size, run.model.max_seq_len)
    label = f"{shape} (scaled: {layers} of {run.model.num_layers} layers)" if scaled else shape
    vocab = run.tokenizer.vocab_size if run.tokenizer.kind == "bpe" else LARGE_VOCAB
    return {"label": label, "run": run, "layers": layers, "batch": batch, "seq_len": seq_len, "vocab": vocab}


def measure(shape: str, tuning: str, checkpointing: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One case, in this process: warm-up step, then `args.steps` measured steps."""
    case = shape_of(shape, args)
    run, device = case["run"], torch.device(args.device)
    tokenizer = synthetic_tokenizer(case["vocab"])
    model = random_model(run.model, tokenizer, num_layers=case["layers"]).to(device).train()
    model = TUNINGS[tuning](model)
    if checkpointing:
        enable_checkpointing(unwrap(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seq_len, prompt = case["seq_len"], case["seq_len"] // 4
    rows = random_tokens(tokenizer, (case["batch"], seq_len)).tolist()
    collator = DiffusionCollator.from_tokenizer(run.sft.diffusion, tokenizer, seq_len)
    collator.set_progress(1.0)  # the edit stage on, as at the end of SFT
    torch.manual_seed(0)
    batch = collator([{"input_ids": r, "eligible_mask": [0] * prompt + [1] * (seq_len - prompt)} for r in rows])
    batch = {k: v.to(device) for k, v in batch.items()}
    mask_id, diffusion = special_token_ids(tokenizer)["mask"], run.sft.diffusion
    cuda = device.type == "cuda"

    def step() -> dict[str, Any]:
        start = time.perf_counter()
        before = torch.cuda.memory_allocated() if cuda else 0
        with saved_tensor_bytes(model) as saved:
            loss = diffusion_loss(model, batch, mask_id=mask_id, normalization=diffusion.loss_normalization,
                                  edit_loss_weight=diffusion.edit_loss_weight).total
        held = torch.cuda.memory_allocated() - before if cuda else None
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - start, "saved": saved[0], "held": held}

    model_rss = psutil.Process().memory_info().rss
    with PeakMemory(interval_s=0.01) as peak:
        step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        measured = [step() for _ in range(args.steps)]
    memory = peak.metrics()
    seconds = statistics.median(m["seconds"] for m in measured)
    return {
        "shape": case["label"], "tuning": tuning, "checkpointing": checkpointing,
        "params_m": count_parameters(model) / 1e6,
        "trained_params_m": count_parameters(model, trainable_only=True) / 1e6,
        "grads_adamw_mb": 12 * count_parameters(model, trainable_only=True) / MIB,
        "batch x tokens": f"{case['batch']} x {seq_len}",
        "step_s": seconds, "tokens_per_s": case["batch"] * seq_len / seconds,
        "saved_activations_mb": statistics.median(m["saved"] for m in measured) / MIB,
        "forward_held_mb": statistics.median(m["held"] for m in measured) / MIB if cuda else None,
        "peak_rss_over_model_mb": memory["peak_rss_mb"] - model_rss / MIB,
        "gpu_peak_allocated_mb": torch.cuda.max_memory_allocated() / MIB if cuda else None,
        "device": args.device, "threads": torch.get_num_threads(), "block_size": diffusion.block_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "fineweb"], choices=("ci", "tiny", "fineweb"))
    parser.add_argument("--tunings", nargs="+", default=list(TUNINGS), choices=list(TUNINGS))
    parser.add_argument("--fineweb-layers", type=int, default=2, help="layers of the fineweb shape (0: all 20)")
    parser.add_argument("--fineweb-batch", type=int, default=2, help="rows per step of the fineweb shape (0: 8)")
    parser.add_argument("--fineweb-seq-len", type=int, default=512, help="tokens per row of the fineweb shape (0: 2048)")
    parser.add_argument("--steps", type=int, default=1, help="measured steps per case (after one warm-up step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in a child process
    args = parser.parse_args()
    if args.case:
        shape, tuning, checkpointing = json.loads(args.case)
        print(json.dumps(measure(shape, tuning, checkpointing, args)))
        return
    rows = []
    for shape in args.shapes:
        for tuning in args.tunings:
            for checkpointing in (False, True):
                child = [sys.executable, "-m", "bench.memory", *sys.argv[1:], "--case",
                         json.dumps([shape, tuning, checkpointing])]
                out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(f"[memory] {shape} {tuning} checkpointing={checkpointing}: {rows[-1]['step_s']:.3f} s/step",
                      file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=2))
    print(markdown_table(COLUMNS, ([row[c] for c in COLUMNS] for row in rows), fmt=significant))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
