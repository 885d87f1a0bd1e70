"""A tiny model learns a structured corpus: the loss halves and samples follow the template."""

import re

import datasets
import torch

from dgpt_core.config import DiffusionConfig, ModelConfig, TrainingConfig
from dgpt_core.diffusion.collator import DiffusionCollator
from dgpt_core.generation.sampler import SamplerConfig, TokenIds, generate
from dgpt_core.models.backbone import build_model
from dgpt_core.models.tokenizer import special_token_ids
from dgpt_core.training.trainer import DiffusionTrainer, training_arguments

from .conftest import ANIMALS, COLORS, structured_corpus

TEMPLATE = re.compile(rf"^the ({'|'.join(COLORS)}) ({'|'.join(ANIMALS)}) sat on the mat \.$")


def test_tiny_model_learns_the_structure_and_samples_it(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    eos = special_token_ids(tok)["eos"]
    texts = structured_corpus(360)
    # the first word is never noised: like a chat prompt, it anchors the canvas it conditions
    ids = [tok.encode(t) + [eos] for t in texts]
    dataset = datasets.Dataset.from_dict({"input_ids": ids, "eligible_mask": [[0] + [1] * (len(x) - 1) for x in ids]})
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_seq_len=32), tok)
    cfg = DiffusionConfig(edit_start=1.0)
    trainer = DiffusionTrainer(
        model=model,
        args=training_arguments(
            TrainingConfig(max_steps=300, per_device_batch_size=32, learning_rate=3e-3, logging_steps=20, max_grad_norm=10.0),
            tmp_path, disable_tqdm=True,
        ),
        train_dataset=dataset,
        data_collator=DiffusionCollator.from_tokenizer(cfg, tok, 32),
        diffusion_config=cfg,
        mask_token_id=special_token_ids(tok)["mask"],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses

    model.eval()
    prompts = [tok.encode("the")] * 16
    n_new = len(ids[0]) - 1  # the rest of the sentence plus its end-of-text

    def matches(strategy, temperature):
        result = generate(model, prompts, TokenIds.from_tokenizer(tok), SamplerConfig(
            strategy=strategy, steps=n_new, max_new_tokens=n_new, temperature=temperature, seed=0))
        texts_out = ["the" + tok.decode(answer) for answer in result.answers]
        return sum(bool(TEMPLATE.match(t)) for t in texts_out), texts_out

    for strategy, temperature, at_least in [("random", 0.0, 14), ("confidence", 0.0, 14), ("confidence", 1.0, 10)]:
        n, texts_out = matches(strategy, temperature)
        assert n >= at_least, (strategy, temperature, texts_out)

    untrained = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_seq_len=32), tok)
    model.load_state_dict(untrained.state_dict())
    assert matches("confidence", 0.0)[0] == 0, "an untrained model must not pass by accident"
