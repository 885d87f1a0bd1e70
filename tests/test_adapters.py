"""peft adapters of `dgpt_core.models.adapters` on a tiny random ModernBERT: only the adapter
trains, and the merged folder, the adapter folder and the in-memory adapted model give the same
logits and decode the same tokens; a training stage with an adapter resumes exactly."""

import copy
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from transformers import ModernBertForMaskedLM, TrainerCallback

from dgpt_core.config import load_run_config
from dgpt_core.config.adapter import AdapterConfig
from dgpt_core.generation.options import SamplerConfig
from dgpt_core.generation.sampler import generate
from dgpt_core.models.adapters import (
    attach_adapter,
    is_adapter_folder,
    load_merged_model,
    save_adapted_folder,
)
from dgpt_core.models.backbone import build_model
from dgpt_core.models.export import save_model_folder
from dgpt_core.training.stage import train_stage
from tests.tiny_models import IDS, PROMPTS, tiny_modernbert

from .conftest import structured_corpus

METHODS = ["lora", "dora", "loha", "lokr", "ia3"]
FOLDER_METHODS = [pytest.param(m, marks=[pytest.mark.slow] if m in ("dora", "loha", "lokr") else []) for m in METHODS]
"""LoRA and IA3 save and load by default; the other methods' folders run with -m slow."""


def trained(method: str, steps: int = 3) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny model with `method`'s adapter after `steps` AdamW steps, and its initial weights."""
    model = tiny_modernbert().train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = attach_adapter(model, AdapterConfig(method=method, rank=4))
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(6, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(adapted(input_ids=ids).logits.flatten(0, 1), ids.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return adapted.eval(), initial


@pytest.mark.parametrize("method", METHODS)
def test_only_the_adapter_trains_and_the_base_weights_stay(method):
    adapted, initial = trained(method)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    prefix = adapted.base_model.prefix  # peft's name of the adapter's parameters: lora_, hada_, lokr_, ia3_
    assert trainable and all(prefix in n for n in trainable), trainable
    assert 0 < adapted.get_nb_trainable_parameters()[0] == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    base = adapted.get_base_model().state_dict()
    for key, value in initial.items():  # injected layers keep the original weight as base_layer.weight
        name = key if key in base else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(base[name], value, rtol=0, atol=0, msg=key)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert not torch.allclose(adapted(input_ids=ids).logits, tiny_modernbert()(input_ids=ids).logits)


@pytest.mark.parametrize("method", FOLDER_METHODS)
def test_merged_and_adapter_folders_load_as_the_adapted_model(method, tiny_tokenizer, tmp_path):
    adapted, _ = trained(method)
    base_dir = tmp_path / "base"
    tiny_modernbert().save_pretrained(base_dir)
    ids = torch.tensor(PROMPTS[1:])
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
    save_adapted_folder(copy.deepcopy(adapted), tiny_tokenizer, tmp_path / "merged", base_dir, "merged")
    save_adapted_folder(adapted, tiny_tokenizer, tmp_path / "adapter", base_dir,
                        "merged" if method == "dora" else "adapter")  # see the test below
    if method == "dora":
        return
    assert not is_adapter_folder(tmp_path / "merged") and is_adapter_folder(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (base_dir / "model.safetensors").resolve()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < weights.stat().st_size
    for folder in ("merged", "adapter"):
        model = ModernBertForMaskedLM.from_pretrained(tmp_path / folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4, msg=folder)
    merged = load_merged_model(tmp_path / "adapter").eval()
    assert type(merged) is ModernBertForMaskedLM and not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_the_merged_folder_decodes_like_the_unmerged_model(tiny_tokenizer, tmp_path):
    adapted, _ = trained("lora", steps=5)
    base_dir = tmp_path / "base"
    tiny_modernbert().save_pretrained(base_dir)
    save_adapted_folder(copy.deepcopy(adapted), tiny_tokenizer, tmp_path / "adapter", base_dir, "adapter")
    cfg = SamplerConfig(strategy="confidence", steps=4, max_new_tokens=8, stop_token_ids=())
    unmerged = generate(adapted.get_base_model(), PROMPTS, IDS, cfg, seed=0).canvas  # the adapter's layers injected
    save_adapted_folder(adapted, tiny_tokenizer, tmp_path / "merged", base_dir, "merged")
    for folder in ("merged", "adapter"):
        model = ModernBertForMaskedLM.from_pretrained(tmp_path / folder).eval()
        assert torch.equal(generate(model, PROMPTS, IDS, cfg, seed=0).canvas, unmerged), folder
    plain = generate(tiny_modernbert(), PROMPTS, IDS, cfg, seed=0).canvas
    assert not torch.equal(plain, unmerged), "the adapter changed nothing the decoder sees"


def test_dora_is_saved_merged_only():
    """transformers' own adapter loading leaves DoRA's magnitudes untrained (measured: logits off by
    1.6e-3 on the tiny model), so the config refuses an unmerged DoRA folder."""
    with pytest.raises(ValueError, match="dora needs adapter.save=merged"):
        AdapterConfig(method="dora", save="adapter")


def test_a_config_without_an_adapter_attaches_none():
    with pytest.raises(ValueError, match="attaches no adapter"):
        attach_adapter(tiny_modernbert(), AdapterConfig())


# --------------------------------------------------------------------------- a training stage with an adapter

STAGE = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
         "model.max_seq_len=64", "sft.max_steps=6", "sft.per_device_batch_size=4", "sft.warmup_ratio=0",
         "sft.logging_steps=1", "sft.save_steps=2", "sft.save_total_limit=3", "sft.deepspeed=null",
         "sft.val_max_sequences=4", "sft.val_t_points=2", "sft.learning_rate=1e-2",
         "sft.adapter.method=lora", "sft.adapter.rank=4"]


class TrainedWeights(TrainerCallback):
    """The adapted model's weights when training ends (the stage merges the adapter when it saves)."""

    weights: dict[str, torch.Tensor] = {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}


@pytest.fixture(scope="module")
def stage_inputs(tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapter_stage")
    tiny_tokenizer.save_pretrained(root / "tokenizer")
    texts = structured_corpus(40)
    rows = [tiny_tokenizer.encode(t) for t in texts]
    answer_only = [[0] * (len(r) // 2) + [1] * (len(r) - len(r) // 2) for r in rows]  # the second half scored
    splits = {name: datasets.Dataset.from_dict({"input_ids": rows[part], "eligible_mask": answer_only[part]})
              for name, part in (("train", slice(0, 32)), ("validation", slice(32, None)))}
    datasets.DatasetDict(splits).save_to_disk(str(root / "data"))
    torch.manual_seed(0)
    save_model_folder(build_model(load_run_config("ci", STAGE).model, tiny_tokenizer), tiny_tokenizer, root / "init")
    return {"data": root / "data", "tokenizer": root / "tokenizer", "init": root / "init"}


def adapter_stage(inputs: dict[str, Path], out: Path, *overrides: str, resume: bool = False,
                  callbacks: list | None = None):
    return train_stage(load_run_config("ci", [*STAGE, *overrides]), "sft", inputs["data"], inputs["tokenizer"],
                       out, init_model_dir=inputs["init"], resume=resume, callbacks=callbacks, show_progress=False)


def logged_losses(out: Path, step: int = 6) -> dict[int, float]:
    state = json.loads((out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def test_lora_sft_trains_the_adapter_alone_and_resumes_exactly(stage_inputs, tmp_path):
    """SFT with a LoRA adapter: the optimizer moves the adapter only (the base weights are the starting folder's,
    bit for bit); a run resumed from its step-4 checkpoint logs the uninterrupted run's losses and
    saves the same model; the adapter folder loads as the merged one."""
    final = TrainedWeights()
    out = tmp_path / "lora"
    result = adapter_stage(stage_inputs, out, "sft.adapter.save=adapter", callbacks=[final])
    metrics = result.metrics
    assert 0 < metrics["trainable_parameters"] < metrics["parameters"] / 5
    initial = ModernBertForMaskedLM.from_pretrained(stage_inputs["init"]).state_dict()
    trained_base = final.weights
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in trained_base.items()), "the adapter trained"
    for key, value in initial.items():
        name = key if key in trained_base else key.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(trained_base[name], value, rtol=0, atol=0, msg=key)
    assert is_adapter_folder(result.model_dir)
    losses = logged_losses(out)

    # what a kill after step 5 leaves: the last complete checkpoint is step 4
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    assert (out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors").exists()  # the adapter alone
    resumed = adapter_stage(stage_inputs, out, "sft.adapter.save=adapter", resume=True)
    assert resumed.metrics["steps"] == 6 and logged_losses(out) == pytest.approx(losses, rel=1e-6)

    merged = adapter_stage(stage_inputs, tmp_path / "merged")
    assert not is_adapter_folder(merged.model_dir)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        logits = [ModernBertForMaskedLM.from_pretrained(d).eval()(input_ids=ids).logits
                  for d in (result.model_dir, resumed.model_dir, merged.model_dir)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[2], logits[0], rtol=1e-4, atol=1e-4)


def test_a_fresh_model_cannot_be_adapted(stage_inputs, tmp_path):
    run = load_run_config("ci", [*(o.replace("sft.", "pretrain.") for o in STAGE)])
    with pytest.raises(ValueError, match="needs a model to adapt"):
        train_stage(run, "pretrain", stage_inputs["data"], stage_inputs["tokenizer"], tmp_path, show_progress=False)


def test_the_pipeline_and_dgpt_serve_load_an_adapter_folder_as_its_merged_folder(tiny_tokenizer, tmp_path):
    """`dgpt generate` / `dgpt serve` (`load_pipeline`) and a fresh process's
    pipeline("text-diffusion", trust_remote_code=True) answer from the adapter folder exactly as from
    the merged one."""
    import os
    import subprocess
    import sys
    import textwrap

    from dgpt_core._cli.generate import load_pipeline
    from dgpt_core.config import ModelConfig

    torch.manual_seed(0)
    base = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64),
                       tiny_tokenizer)
    save_model_folder(base, tiny_tokenizer, tmp_path / "base")
    adapted = attach_adapter(base, AdapterConfig(method="lora", rank=4))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5, generator=torch.Generator().manual_seed(len(name)))
    defaults = {"strategy": "confidence", "steps": 4, "max_new_tokens": 8}
    save_adapted_folder(copy.deepcopy(adapted), tiny_tokenizer, tmp_path / "adapter", tmp_path / "base", "adapter",
                        sampler_defaults=defaults)
    save_adapted_folder(adapted, tiny_tokenizer, tmp_path / "merged", tmp_path / "base", "merged",
                        sampler_defaults=defaults)
    answers = {name: load_pipeline(str(tmp_path / name), "cpu")("the red cat", seed=0)[0]["generated_text"]
               for name in ("adapter", "merged", "base")}
    assert answers["adapter"] == answers["merged"] != answers["base"], answers
    script = textwrap.dedent(f"""
        import transformers
        pipe = transformers.pipeline("text-diffusion", model={str(tmp_path / "adapter")!r}, trust_remote_code=True)
        print(repr(pipe("the red cat", seed=0)[0]["generated_text"]))
        """)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == repr(answers["merged"])
