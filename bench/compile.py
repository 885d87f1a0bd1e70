"""`torch.compile` of the ModernBERT backbone (`model.model`) on the CPU, against eager.

- `sampling`: tokens/s of threshold decoding (tau 0.9, greedy, seed 0, steps capped at the canvas)
  on the long-answer workload (the world's biography requests of held-out people, else the skills
  test items), the model under test with its backbone compiled (`dynamic=True`: finished rows
  leave the batch, so shapes change every few steps) vs eager, alternating; and whether both
  decode the same answers;
- `training`: median seconds of a forward + backward + AdamW step of the diffusion loss (masking
  stage, one pre-collated batch of random tokens) on a random model of the run's shape at the
  pretraining stage's batch and the model's sequence length, compiled (`dynamic=None`: the shapes
  are fixed) vs eager, alternating;
- `kept`: per use, whether compiling wins: speedup > KEEP_SPEEDUP and compile seconds < KEEP_COMPILE_S.

Compile seconds are the first compiled call's time minus a compiled call's median, measured cold
(dynamo reset, an empty Inductor cache folder). A part whose compile or run fails reports
`{"error": "<type>: <first line>"}` instead of numbers, and is not kept.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

from dgpt_core.diffusion.collator import DiffusionCollator
from dgpt_core.diffusion.loss import diffusion_loss
from dgpt_core.generation.sampler import SamplerConfig, TokenIds, generate
from dgpt_core.models.tokenizer import special_token_ids

from .common import BenchSizes, Subject, alternate, median_ratio, random_model, random_tokens
from .sample import skills_workload
from .world import bio_workload

KEEP_SPEEDUP = 1.05
"""Compiling is kept for a use when it is more than this much faster..."""
KEEP_COMPILE_S = 60.0
"""...and compiles in less than this many seconds."""


@contextlib.contextmanager
def cold_compile() -> Iterator[None]:
    """Fresh dynamo state and an empty Inductor cache folder, so the first call pays the whole
    compile (generated C++ kernels included)."""
    torch._dynamo.reset()
    try:
        with tempfile.TemporaryDirectory(prefix="inductor-") as folder, temporary_cache_dir(folder):
            yield
    finally:
        torch._dynamo.reset()


@contextlib.contextmanager
def backbone(model: torch.nn.Module, replacement: torch.nn.Module) -> Iterator[None]:
    """`model.model` replaced for the duration."""
    original = model.model
    model.model = replacement
    try:
        yield
    finally:
        model.model = original


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sampling_speed(subject: Subject, sizes: BenchSizes) -> dict[str, Any]:
    """Threshold decoding of the long-answer workload, compiled backbone vs eager."""
    workload = bio_workload(subject, sizes) if subject.world is not None else skills_workload(subject, sizes)
    prompts, canvas, model = workload.prompts, workload.canvas, subject.model
    ids = TokenIds.from_tokenizer(subject.tokenizer)
    cfg = workload.sampler(SamplerConfig(strategy="threshold", threshold=0.9, temperature=0.0, seed=0, steps=canvas))
    nets = {"eager": model.model, "compiled": torch.compile(model.model, dynamic=True)}
    answers: dict[str, list[tuple[list[int], bool]]] = {}

    def runner(name: str) -> Callable[[], None]:
        def run() -> None:
            got: list[tuple[list[int], bool]] = []
            with backbone(model, nets[name]):
                for start in range(0, len(prompts), sizes.batch_size):
                    result = generate(model, prompts[start : start + sizes.batch_size], ids, cfg)
                    got += zip(result.answers, result.stopped)
            answers[name] = got

        return run

    fns = {name: runner(name) for name in nets}
    fns["eager"]()  # warm-up
    first = timed(fns["compiled"])
    seconds = alternate(fns, sizes.reps, warmup=False)
    tokens = {name: sum(len(a) + s for a, s in got) for name, got in answers.items()}
    tps = {name: [tokens[name] / s for s in seconds[name]] for name in nets}
    return {
        "workload": workload.name, "items": len(prompts), "canvas": canvas, "batch_size": sizes.batch_size,
        "tokens": tokens["eager"],
        "compile_s": first - statistics.median(seconds["compiled"]),
        "eager_tokens_per_s": statistics.median(tps["eager"]),
        "compiled_tokens_per_s": statistics.median(tps["compiled"]),
        "speedup": median_ratio(tps["compiled"], tps["eager"]),
        "identical_outputs": answers["eager"] == answers["compiled"],
    }


def training_speed(subject: Subject, sizes: BenchSizes) -> dict[str, Any]:
    """Diffusion-loss training steps on the run's shape, compiled backbone vs eager."""
    run, tokenizer = subject.run, subject.tokenizer
    stage, length = run.pretrain, run.model.max_seq_len
    batch = stage.per_device_batch_size
    collator = DiffusionCollator.from_tokenizer(stage.diffusion, tokenizer, length)
    collator.set_progress(0.0)
    inputs = collator([{"input_ids": row} for row in random_tokens(tokenizer, (batch, length)).tolist()])
    mask_id = special_token_ids(tokenizer)["mask"]

    def stepper(compiled: bool) -> Callable[[], None]:
        model = random_model(run.model, tokenizer).train()
        if compiled:
            model.model = torch.compile(model.model, dynamic=None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def steps() -> None:
            for _ in range(sizes.train_steps):
                diffusion_loss(model, inputs, mask_id=mask_id, normalization=stage.diffusion.loss_normalization,
                               edit_loss_weight=stage.diffusion.edit_loss_weight).total.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return steps

    fns = {"eager": stepper(False), "compiled": stepper(True)}
    fns["eager"]()  # warm-up
    first = timed(fns["compiled"]) / sizes.train_steps
    seconds = alternate(fns, sizes.reps, warmup=False)
    step_s = {name: [s / sizes.train_steps for s in times] for name, times in seconds.items()}
    return {
        "batch": batch, "seq_len": length, "steps_per_rep": sizes.train_steps,
        "compile_s": first - statistics.median(step_s["compiled"]),
        "eager_step_s": statistics.median(step_s["eager"]),
        "compiled_step_s": statistics.median(step_s["compiled"]),
        "speedup": median_ratio(step_s["eager"], step_s["compiled"]),
    }


def compile_suite(subject: Subject, sizes: BenchSizes) -> dict[str, Any]:
    """`sampling`, `training` (each its numbers or `{"error": ...}`) and `kept`."""
    out: dict[str, Any] = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__}
    for use, measure in (("sampling", sampling_speed), ("training", training_speed)):
        try:
            with cold_compile():
                out[use] = measure(subject, sizes)
        except Exception as error:  # a missing C++ compiler, an unsupported op: report, do not pretend
            line = (str(error).strip().splitlines() or [""])[0]
            out[use] = {"error": f"{type(error).__name__}: {line}"[:300]}
    out["kept"] = {use: "error" not in out[use] and out[use]["speedup"] > KEEP_SPEEDUP
                   and out[use]["compile_s"] < KEEP_COMPILE_S for use in ("sampling", "training")}
    return out
