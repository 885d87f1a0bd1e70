"""The diffusion loss and DiffusionTrainer: normalisation, accumulation, NaN abort, DeepSpeed."""

import os

import datasets
import pytest
import torch
import torch.nn.functional as F

from dgpt_core.config import DiffusionConfig, TrainingConfig
from dgpt_core.diffusion.collator import DiffusionCollator
from dgpt_core.diffusion.loss import diffusion_loss, token_nll
from dgpt_core.models.tokenizer import special_token_ids
from dgpt_core.training.stage import single_process_env
from dgpt_core.training.trainer import DiffusionTrainer, NonFiniteLossError, training_arguments

from .conftest import structured_corpus


@pytest.mark.parametrize("overwrite", [False, True])
def test_token_nll_equals_cross_entropy_with_the_mask_logit_removed(overwrite):
    torch.manual_seed(0)
    leaf = torch.randn(7, 11, requires_grad=True)
    targets = torch.tensor([0, 1, 3, 4, 5, 9, 10])
    reference = F.cross_entropy(leaf.detach().index_fill(1, torch.tensor([2]), float("-inf")), targets, reduction="none")
    reference_grad = torch.autograd.grad(
        F.cross_entropy(leaf.index_fill(1, torch.tensor([2]), float("-inf")), targets, reduction="sum"), leaf)[0]
    ours = token_nll(leaf * 1.0, targets, suppressed_id=2, overwrite=overwrite)  # `* 1.0`: a fresh non-leaf
    assert torch.allclose(ours, reference, atol=1e-5)
    ours.sum().backward()
    assert torch.allclose(leaf.grad, reference_grad, atol=1e-6)
    assert torch.allclose(leaf.grad[:, 2], torch.zeros(7), atol=1e-6), "no gradient into the mask logit"


def corrupted_batch(tokenizer, n=8, **cfg):
    collator = DiffusionCollator.from_tokenizer(DiffusionConfig(**cfg), tokenizer, max_length=64)
    collator.set_progress(1.0)
    features = [{"input_ids": tokenizer.encode(text)} for text in structured_corpus(n)]
    return collator(features)


def test_token_and_sequence_normalisation(tiny_model, tiny_tokenizer):
    batch = corrupted_batch(tiny_tokenizer, edit_start=0.0)
    mask_id = special_token_ids(tiny_tokenizer)["mask"]
    eligible = (batch["labels"] != -100).sum(1)
    token = diffusion_loss(tiny_model, batch, mask_id=mask_id, normalization="token")
    seq = diffusion_loss(tiny_model, batch, mask_id=mask_id, normalization="sequence")
    assert torch.isclose(token.total, token.masked + token.edit)
    assert token.edit > 0 and token.masked > 0
    # hand computation from per-position NLLs
    scored = batch["masked_positions"] | batch["edit_positions"]
    from dgpt_core.models.backbone import logits_at

    nll = token_nll(logits_at(tiny_model, batch["input_ids"], batch["attention_mask"], scored), batch["labels"][scored], mask_id)
    rows = scored.nonzero()[:, 0]
    assert torch.equal(batch["loss_weight"], (1.0 / batch["t"])[:, None].expand_as(batch["loss_weight"]))  # linear: w = 1/t
    weight = torch.where(batch["masked_positions"][scored], batch["loss_weight"][scored], 1.0)
    assert torch.isclose(token.total, (nll * weight).sum() / eligible.sum(), rtol=1e-5)
    per_row = torch.zeros(len(eligible)).index_add(0, rows, nll * weight) / eligible
    assert torch.isclose(seq.total, per_row.mean(), rtol=1e-5)


class FixedBatchCollator:
    """Slices a pre-corrupted batch by example id, so any batching sees identical corruption."""

    def __init__(self, batch):
        self.batch = batch

    def __call__(self, features):
        rows = torch.tensor([f["row"] for f in features])
        return {key: (value[rows] if value.dim() else value) for key, value in self.batch.items()}


def one_step_weights(model, tokenizer, batch, batch_size, accumulation, normalization, tmp_path):
    cfg = DiffusionConfig(loss_normalization=normalization)
    args = training_arguments(
        TrainingConfig(max_steps=1, per_device_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                       learning_rate=0.5, warmup_ratio=0.0, lr_scheduler="constant", max_grad_norm=1e9, weight_decay=0.0),
        tmp_path, optim="sgd", disable_tqdm=True,
    )
    dataset = datasets.Dataset.from_dict({"row": list(range(batch["input_ids"].shape[0]))})
    trainer = DiffusionTrainer(model=model, args=args, train_dataset=dataset, data_collator=FixedBatchCollator(batch),
                               diffusion_config=cfg, mask_token_id=special_token_ids(tokenizer)["mask"])
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_gradient_accumulation_two_by_four_equals_one_by_eight(tiny_tokenizer, tmp_path, normalization):
    from dgpt_core.config import ModelConfig
    from dgpt_core.models.backbone import build_model

    batch = corrupted_batch(tiny_tokenizer, n=8, edit_start=0.0)

    def fresh():
        torch.manual_seed(0)
        return build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64), tiny_tokenizer)

    initial = {n: p.detach().clone() for n, p in fresh().named_parameters()}
    big = one_step_weights(fresh(), tiny_tokenizer, batch, 8, 1, normalization, tmp_path / "a")
    accumulated = one_step_weights(fresh(), tiny_tokenizer, batch, 4, 2, normalization, tmp_path / "b")
    moved = sum((big[n] - initial[n]).abs().sum() for n in big)
    assert moved > 1e-3
    for name in big:
        assert torch.allclose(big[name], accumulated[name], atol=1e-6), name


def structured_dataset(tokenizer, n=64):
    return datasets.Dataset.from_dict({"input_ids": [tokenizer.encode(t) for t in structured_corpus(n)]})


def test_nan_loss_aborts_training(tiny_model, tiny_tokenizer, tmp_path):
    with torch.no_grad():
        tiny_model.head.dense.weight.fill_(float("nan"))
    cfg = DiffusionConfig()
    trainer = DiffusionTrainer(
        model=tiny_model,
        args=training_arguments(TrainingConfig(max_steps=3, per_device_batch_size=4), tmp_path, disable_tqdm=True),
        train_dataset=structured_dataset(tiny_tokenizer),
        data_collator=DiffusionCollator.from_tokenizer(cfg, tiny_tokenizer, 64),
        diffusion_config=cfg,
        mask_token_id=special_token_ids(tiny_tokenizer)["mask"],
    )
    with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
        trainer.train()


@pytest.mark.parametrize("sampling", ["random", "group_by_length"])
def test_grouping_by_length_pads_short_examples_less(tiny_model, tiny_tokenizer, tmp_path, sampling):
    rows = [[7] * (40 if i % 4 == 0 else 4) for i in range(64)]  # one example in four 10x longer
    cfg = DiffusionConfig(edit_start=1.0)  # no insertions: a batch is as wide as its longest example
    trainer = DiffusionTrainer(
        model=tiny_model,
        args=training_arguments(TrainingConfig(max_steps=8, per_device_batch_size=8, train_sampling=sampling),
                                tmp_path, disable_tqdm=True),
        train_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
        data_collator=DiffusionCollator.from_tokenizer(cfg, tiny_tokenizer, 64),
        diffusion_config=cfg,
        mask_token_id=special_token_ids(tiny_tokenizer)["mask"],
    )
    widths = sorted(batch["input_ids"].shape[1] for batch in trainer.get_train_dataloader())
    assert len(widths) == 8
    if sampling == "random":  # a random batch of 8 holds a long example nine times in ten
        assert widths.count(40) >= 6
    else:  # groups of two batches sorted by length: the second holds short examples only
        assert widths.count(4) >= 3


def test_trainer_logs_the_loss_parts_and_curriculum(tiny_model, tiny_tokenizer, tmp_path):
    cfg = DiffusionConfig(edit_start=0.5, edit_prob=0.2)
    trainer = DiffusionTrainer(
        model=tiny_model,
        args=training_arguments(TrainingConfig(max_steps=8, per_device_batch_size=8, logging_steps=2), tmp_path, disable_tqdm=True),
        train_dataset=structured_dataset(tiny_tokenizer),
        data_collator=DiffusionCollator.from_tokenizer(cfg, tiny_tokenizer, 64),
        diffusion_config=cfg,
        mask_token_id=special_token_ids(tiny_tokenizer)["mask"],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "masked_loss" in h]
    assert len(logs) == 4
    for log in logs:
        assert {"loss", "masked_loss", "edit_loss", "mean_t", "edit_prob", "edit_stage", "tokens_per_second", "grad_norm"} <= set(log)
        assert log["loss"] == pytest.approx(log["masked_loss"] + log["edit_loss"], rel=1e-4)
        assert 0 < log["mean_t"] < 1 and log["tokens_per_second"] > 0
    assert logs[0]["edit_stage"] == 0 and logs[0]["edit_loss"] == 0
    assert logs[-1]["edit_stage"] == 1 and logs[-1]["edit_loss"] > 0 and logs[-1]["edit_prob"] == pytest.approx(0.2)


@pytest.fixture
def single_process_distributed_env(monkeypatch, tmp_path_factory):
    """A one-process DeepSpeed group for the test; afterwards no DeepSpeed state is left behind
    (accelerate sets ACCELERATE_USE_DEEPSPEED=true for good, which turns later Trainers into
    DeepSpeed ones)."""
    from accelerate.state import AcceleratorState

    env = {**single_process_env(), "DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "false",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.mktemp("ext")))}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_zero2_training_through_the_deepspeed_engine(tiny_tokenizer, tmp_path, single_process_distributed_env):
    from pathlib import Path

    from dgpt_core.config import ModelConfig
    from dgpt_core.models.backbone import build_model

    zero2 = str(Path(__file__).parents[1] / "dgpt_core" / "training" / "deepspeed" / "zero2.json")
    cfg = DiffusionConfig(edit_start=0.0, insert_prob=0.05)
    args = training_arguments(
        TrainingConfig(max_steps=6, per_device_batch_size=8, logging_steps=3, deepspeed=zero2, use_cpu=True),
        tmp_path, disable_tqdm=True,
    )
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64), tiny_tokenizer)
    trainer = DiffusionTrainer(
        model=model, args=args, train_dataset=structured_dataset(tiny_tokenizer),
        data_collator=DiffusionCollator.from_tokenizer(cfg, tiny_tokenizer, 64),
        diffusion_config=cfg, mask_token_id=special_token_ids(tiny_tokenizer)["mask"],
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine"
    assert trainer.model_wrapped.zero_optimization_stage() == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
