"""Gradient checkpointing (`TrainingConfig.gradient_checkpointing`) through the stage trainers, and
the peak-memory measurement of the stages' metrics, on tiny random ModernBERTs."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator

import datasets
import psutil
import pytest
import torch
from transformers import TrainerCallback

from dgpt_core.config import DiffusionConfig, TrainingConfig
from dgpt_core.config.rl import RLConfig
from dgpt_core.diffusion.collator import DiffusionCollator
from dgpt_core.generation.options import INFO_KEY, SamplerConfig
from dgpt_core.generation.schedules import NoiseSchedule
from dgpt_core.rlhf.trainer import GRPOTrainer, index_collator
from dgpt_core.training.memory import MIB, PeakMemory
from dgpt_core.training.trainer import DiffusionTrainer, training_arguments

from .tiny_models import IDS, PROMPTS, tiny_modernbert

BLOCK = 4


@pytest.fixture(autouse=True)
def no_deepspeed_state(monkeypatch):
    """No DeepSpeed process state left by an earlier in-process DeepSpeed test (it would turn these
    Trainers into DeepSpeed ones)."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class GradientProbe(TrainerCallback):
    """Copies every parameter's gradient just before the (only) optimizer step."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@contextlib.contextmanager
def counted_layer_forwards(model: torch.nn.Module) -> Iterator[list[int]]:
    """While open, how often the layers' attention modules started a forward ([count]). The Trainer
    checkpoints each layer's `forward`, and the recompute in the backward calls the attention again:
    twice per layer and micro-batch with checkpointing, once without. (A pre-hook: torch stops a
    recompute once the last saved tensor is back, before the layer's last module returns.)"""
    count = [0]

    def hook(*_):
        count[0] += 1

    handles = [layer.attn.register_forward_pre_hook(hook) for layer in model.model.layers]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


class FixedBatch:
    """The rows of one pre-corrupted batch, so both runs train on identical corruption."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __call__(self, features):
        rows = torch.tensor([f["row"] for f in features])
        return {key: (value[rows] if value.dim() else value) for key, value in self.batch.items()}


def sft_batch(block_size: int | None) -> dict[str, torch.Tensor]:
    """Six chat rows of random tokens (prompt not scored), corrupted once with a fixed seed."""
    gen = torch.Generator().manual_seed(1)
    features = []
    for i in range(6):
        prompt = torch.randint(6, 64, (3 + i % 3,), generator=gen).tolist()
        answer = torch.randint(6, 64, (5 + 2 * i,), generator=gen).tolist()
        features.append({"input_ids": prompt + answer, "eligible_mask": [0] * len(prompt) + [1] * len(answer)})
    collator = DiffusionCollator(DiffusionConfig(block_size=block_size), mask_id=IDS.mask, pad_id=IDS.pad,
                                 delete_id=IDS.delete, replacement_ids=list(range(6, 64)), max_length=64)
    torch.manual_seed(2)
    return collator(features)


def checkpointing_flags(model: torch.nn.Module) -> list[bool]:
    return [layer.gradient_checkpointing for layer in model.model.layers]


def diffusion_step(block_size: int | None, checkpointing: bool, out_dir) -> tuple[float, dict[str, torch.Tensor], int, list[bool]]:
    """One optimizer step of the DiffusionTrainer on `sft_batch`: the loss, every gradient, the
    layer forwards it ran and the layers' checkpointing flags after it."""
    model = tiny_modernbert()
    batch = sft_batch(block_size)
    probe = GradientProbe()
    cfg = TrainingConfig(max_steps=1, per_device_batch_size=6, logging_steps=1, gradient_checkpointing=checkpointing)
    trainer = DiffusionTrainer(
        model=model, args=training_arguments(cfg, out_dir, disable_tqdm=True), data_collator=FixedBatch(batch),
        train_dataset=datasets.Dataset.from_dict({"row": list(range(6))}),
        diffusion_config=DiffusionConfig(block_size=block_size), mask_token_id=IDS.mask, callbacks=[probe],
    )
    with counted_layer_forwards(model) as forwards:
        trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, probe.grads, forwards[0], checkpointing_flags(model)


@pytest.mark.parametrize("block_size", [None, BLOCK], ids=["full_canvas", "block_causal"])
def test_checkpointing_recomputes_the_layers_and_keeps_the_loss_and_gradients(block_size, tmp_path):
    loss, grads, forwards, flags = diffusion_step(block_size, False, tmp_path / "plain")
    loss_ckpt, grads_ckpt, forwards_ckpt, flags_ckpt = diffusion_step(block_size, True, tmp_path / "checkpointed")
    layers = len(flags)
    assert (flags, forwards) == ([False] * layers, layers)
    assert (flags_ckpt, forwards_ckpt) == ([True] * layers, 2 * layers)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == len(list(tiny_modernbert().parameters()))
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def grpo_step(block_size: int | None, checkpointing: bool, out_dir) -> tuple[dict[str, torch.Tensor], int, list[bool]]:
    """One GRPO update of the GRPOTrainer (its rollout samples in eval mode without gradients):
    every gradient, the layer forwards of the policy and its checkpointing flags after it."""
    policy = tiny_modernbert()
    if block_size:
        setattr(policy.config, INFO_KEY, {"kind": "sft", "block_size": block_size})
    rl = RLConfig(max_steps=1, per_device_batch_size=2, group_size=4, gradient_checkpointing=checkpointing)
    probe = GradientProbe()
    trainer = GRPOTrainer(
        model=policy, args=training_arguments(rl, out_dir, disable_tqdm=True, include_num_input_tokens_seen="no"),
        train_dataset=datasets.Dataset.from_dict({"index": [0, 1]}), data_collator=index_collator, callbacks=[probe],
        reference=copy.deepcopy(policy), prompts=PROMPTS, reward=lambda _, answer: sum(t % 2 for t in answer) / 4,
        kinds=["toy", "toy"], rl_config=rl, token_ids=IDS, schedule=NoiseSchedule("linear"),
        sampler=SamplerConfig(strategy="random", steps=4, max_new_tokens=4, stop_token_ids=[], block_size=block_size),
    )
    with counted_layer_forwards(policy) as forwards:
        trainer.train()
    return probe.grads, forwards[0], checkpointing_flags(policy)


@pytest.mark.parametrize("block_size", [None, BLOCK], ids=["full_canvas", "block_causal"])
def test_grpo_updates_under_checkpointing_equal_the_plain_ones(block_size, tmp_path):
    grads, forwards, flags = grpo_step(block_size, False, tmp_path / "plain")
    grads_ckpt, forwards_ckpt, flags_ckpt = grpo_step(block_size, True, tmp_path / "checkpointed")
    assert not any(flags) and all(flags_ckpt)
    # the rollout's forwards run once either way; the update's layers run again in the backward
    assert forwards_ckpt > forwards
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_peak_memory_sees_a_buffer_freed_before_the_block_ends():
    start_mb = psutil.Process().memory_info().rss / MIB
    with PeakMemory(interval_s=0.02) as memory:
        buffer = torch.ones(64 * MIB // 4)  # 64 MiB, written, so resident
        time.sleep(0.2)
        del buffer
    metrics = memory.metrics()
    assert metrics["peak_rss_mb"] >= start_mb + 60
    assert ("gpu_peak_allocated_mb" in metrics) == torch.cuda.is_available()
