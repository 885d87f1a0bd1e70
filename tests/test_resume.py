"""Resuming from the middle gives exactly the losses of the uninterrupted run (torchtune-style)."""

import shutil
from pathlib import Path

import datasets
import pytest
import torch

from dgpt_core.config import DiffusionConfig, ModelConfig, TrainingConfig
from dgpt_core.diffusion.collator import DiffusionCollator
from dgpt_core.models.backbone import build_model
from dgpt_core.models.tokenizer import special_token_ids
from dgpt_core.training.trainer import (
    COMPLETE_MARKER,
    DiffusionTrainer,
    latest_complete_checkpoint,
    training_arguments,
)

from .conftest import structured_corpus


def make_trainer(tok, out_dir, max_steps=8):
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64), tok)
    cfg = DiffusionConfig(edit_start=0.5, edit_prob=0.2, insert_prob=0.05)
    args = training_arguments(
        TrainingConfig(max_steps=max_steps, per_device_batch_size=4, logging_steps=1, save_steps=4, save_total_limit=3),
        out_dir, disable_tqdm=True,
    )
    dataset = datasets.Dataset.from_dict({"input_ids": [tok.encode(t) for t in structured_corpus(40)]})
    return DiffusionTrainer(model=model, args=args, train_dataset=dataset,
                            data_collator=DiffusionCollator.from_tokenizer(cfg, tok, 64),
                            diffusion_config=cfg, mask_token_id=special_token_ids(tok)["mask"])


def step_losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_resumed_losses_equal_the_uninterrupted_run(tiny_tokenizer, tmp_path):
    full = make_trainer(tiny_tokenizer, tmp_path / "full")
    full.train()
    expected = step_losses(full)
    assert sorted(expected) == list(range(1, 9))

    checkpoint = latest_complete_checkpoint(tmp_path / "full")
    assert checkpoint.name == "checkpoint-8" and (checkpoint / COMPLETE_MARKER).exists()
    # an unmarked (half-written) later checkpoint is ignored
    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "partial" / "checkpoint-4")
    shutil.copytree(tmp_path / "full" / "checkpoint-8", tmp_path / "partial" / "checkpoint-8")
    (tmp_path / "partial" / "checkpoint-8" / COMPLETE_MARKER).unlink()
    checkpoint = latest_complete_checkpoint(tmp_path / "partial")
    assert checkpoint.name == "checkpoint-4"

    resumed = make_trainer(tiny_tokenizer, tmp_path / "partial")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = step_losses(resumed)  # steps 1-4 come back from the checkpoint's trainer state
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step] == expected[step], (step, got[step], expected[step])


def test_train_loss_is_the_mean_over_the_steps_of_this_session(tiny_tokenizer, tmp_path):
    full = make_trainer(tiny_tokenizer, tmp_path / "full")
    fresh = full.train()
    losses = step_losses(full)
    assert fresh.metrics["train_loss"] == pytest.approx(sum(losses.values()) / 8, rel=1e-6)

    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed = make_trainer(tiny_tokenizer, tmp_path / "resumed")
    output = resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    session_mean = sum(losses[step] for step in range(5, 9)) / 4
    assert output.metrics["train_loss"] == pytest.approx(session_mean, rel=1e-6)
    logged = [h["train_loss"] for h in resumed.state.log_history if "train_loss" in h]
    assert logged == [output.metrics["train_loss"]], "the logged (MLflow) value is the corrected one"


def test_a_kill_during_rotation_leaves_the_new_checkpoint_marked_and_no_marked_half_deleted_one(
        tiny_tokenizer, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_tokenizer, tmp_path, max_steps=8)
    trainer.args.save_steps, trainer.args.save_total_limit = 2, 1
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        """Deletes every file but the marker, then dies (the marker outlives a plain rmtree)."""
        for file in Path(path).iterdir():
            if file.name != COMPLETE_MARKER:
                real_rmtree(file) if file.is_dir() else file.unlink()
        raise KeyboardInterrupt("killed during rotation")

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    half_deleted, newest = sorted((tmp_path).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert (newest / COMPLETE_MARKER).exists() and (newest / "model.safetensors").exists()
    assert not (half_deleted / COMPLETE_MARKER).exists()
    assert latest_complete_checkpoint(tmp_path) == newest
