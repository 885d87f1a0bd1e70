"""Every DeepSpeed config shipped in dgpt_core/training/deepspeed: it parses, its ZeRO section validates, its
name says its stage, and one training step through our trainer (`train_stage`, CPU accelerator)
runs under it with that stage actually in force, and gives the same loss and the same updated
weights as the same step without DeepSpeed; the same again with block-causal training
(`diffusion.block_size`), and one RL (GRPO) update. New JSON files in the folder are covered automatically.

Configs that offload the optimizer to the CPU use DeepSpeedCPUAdam, whose C++ op is JIT-compiled on
first use (measured: 220 s on 2 CPU cores, then ~5-10 s per run from the torch extensions cache), so
those cases are marked slow; run them with `pytest -m slow tests/test_deepspeed_configs.py`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import datasets
import pytest
import torch
from transformers import ModernBertForMaskedLM, TrainerCallback

from dgpt_core.config import load_run_config
from dgpt_core.models.backbone import build_model
from dgpt_core.models.tokenizer import load_tokenizer, special_token_ids
from dgpt_core.training.stage import single_process_env, train_stage
from dgpt_core.training.trainer import DEEPSPEED_CONFIG_DIR, resolve_deepspeed

from .conftest import structured_corpus

CONFIGS = sorted(DEEPSPEED_CONFIG_DIR.glob("*.json"))

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_seq_len=64", "pretrain.max_steps=1", "pretrain.per_device_batch_size=4",
        "pretrain.warmup_ratio=0",  # the one step has the full learning rate, so the weights move
        "pretrain.logging_steps=1", "pretrain.save_steps=null", "pretrain.val_max_sequences=4",
        "pretrain.val_t_points=2", "pretrain.use_cpu=true"]


def _zero(path: Path) -> dict:
    return json.loads(path.read_text())["zero_optimization"]


def _offloads(path: Path) -> bool:
    zero = _zero(path)
    return any((zero.get(key) or {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param"))


def _case(path: Path):
    marks = [pytest.mark.slow] if _offloads(path) else []  # DeepSpeedCPUAdam: a C++ op compiled on first use
    return pytest.param(path, marks=marks, id=path.stem)


def test_the_documented_configs_ship():
    assert {"zero1", "zero2", "zero2_offload", "zero3"} <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_validates_and_its_name_says_its_stage(path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    config = json.loads(path.read_text())
    assert isinstance(config, dict)
    zero = DeepSpeedZeroConfig(**config["zero_optimization"])  # unknown or mistyped keys are errors
    named = re.match(r"zero(\d)", path.stem)
    assert named and int(named.group(1)) == zero.stage, f"{path.name} runs ZeRO stage {zero.stage}"
    assert ("offload" in path.stem) == _offloads(path)
    assert resolve_deepspeed(path.stem) == str(path)  # `pretrain.deepspeed=<name>` finds it
    # every "auto" is one the Trainer fills in from its own arguments
    autos = {key for key, value in config.items() if value == "auto"}
    autos |= {f"{key}.enabled" for key in ("bf16", "fp16") if config.get(key, {}).get("enabled") == "auto"}
    assert autos <= {"gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
                     "train_micro_batch_size_per_gpu", "bf16.enabled", "fp16.enabled"}


# --------------------------------------------------------------------------- one training step


@pytest.fixture(autouse=True)
def clean_process_state(monkeypatch):
    """DeepSpeed on the CPU as one process of one; no accelerate / ZeRO-3 state carried in or out."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    for key, value in single_process_env().items():
        monkeypatch.setenv(key, value)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    unset_hf_deepspeed_config()  # later models must not be built inside zero.Init


@pytest.fixture(scope="module")
def inputs(tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """Dataset, tokenizer and one initial model folder that every run starts from."""
    root = tmp_path_factory.mktemp("ds_inputs")
    tiny_tokenizer.save_pretrained(root / "tokenizer")
    texts = structured_corpus(40)
    splits = {name: datasets.Dataset.from_dict({"input_ids": [tiny_tokenizer.encode(t) for t in part]})
              for name, part in (("train", texts[:32]), ("validation", texts[32:]))}
    datasets.DatasetDict(splits).save_to_disk(str(root / "data"))
    torch.manual_seed(0)
    build_model(load_run_config("ci", TINY).model, tiny_tokenizer).save_pretrained(root / "init")
    return {"data": root / "data", "tokenizer": root / "tokenizer", "init": root / "init"}


class OptimizerProbe(TrainerCallback):
    """The optimizer the Trainer trains with (DeepSpeed's ZeRO optimizer wrapped by accelerate)."""

    optimizer = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = optimizer


BLOCKS = ["pretrain.diffusion.block_size=8"]  # block-causal pretraining: BD3-LM's vectorised batch


def one_step(inputs: dict[str, Path], out: Path, deepspeed: str | None, probe: OptimizerProbe | None = None,
             overrides: tuple[str, ...] = ()):
    run = load_run_config("ci", [*TINY, *overrides, f"pretrain.deepspeed={deepspeed or 'null'}"])
    return train_stage(run, "pretrain", inputs["data"], inputs["tokenizer"], out, init_model_dir=inputs["init"],
                       callbacks=[probe] if probe else None, show_progress=False)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in ModernBertForMaskedLM.from_pretrained(model_dir).state_dict().items()}


def plain_step(inputs: dict[str, Path], out: Path, overrides: tuple[str, ...] = ()):
    """The same step without DeepSpeed: (train_loss, updated weights)."""
    from accelerate.state import AcceleratorState

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_USE_DEEPSPEED", "false")
        AcceleratorState._reset_state(reset_partial_state=True)
        result = one_step(inputs, out, None, overrides=overrides)
        AcceleratorState._reset_state(reset_partial_state=True)
    return result.metrics["train_loss"], weights(result.model_dir)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    return plain_step(inputs, tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def block_reference(inputs, tmp_path_factory):
    return plain_step(inputs, tmp_path_factory.mktemp("plain_blocks"), tuple(BLOCKS))


def zero_in_force(optimizer) -> tuple[int, bool]:
    """(ZeRO stage, optimizer offloaded to the CPU) of the optimizer DeepSpeed built."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = optimizer.optimizer  # accelerate's DeepSpeedOptimizerWrapper -> DeepSpeed's optimizer
    if isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
        stage, offload = 3, bool(zero.offload_optimizer)
    else:
        assert isinstance(zero, DeepSpeedZeroOptimizer), type(zero)
        stage, offload = (2 if zero.partition_gradients else 1), bool(zero.cpu_offload)
    assert isinstance(zero.optimizer, DeepSpeedCPUAdam) == offload, type(zero.optimizer)
    return stage, offload


@pytest.mark.parametrize("path", [_case(p) for p in CONFIGS])
def test_one_training_step_on_cpu(path, inputs, reference, tmp_path):
    from safetensors.torch import load_file
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    ref_loss, ref_weights = reference
    probe = OptimizerProbe()
    result = one_step(inputs, tmp_path / path.stem, path.stem, probe)
    zero3_left_on = is_deepspeed_zero3_enabled()
    unset_hf_deepspeed_config()  # this test's own loads below must build full models
    metrics = result.metrics

    # the step ran, under the config's ZeRO stage and offload
    assert metrics["steps"] == 1 and metrics["world_size"] == 1
    assert zero_in_force(probe.optimizer) == (_zero(path)["stage"], _offloads(path))
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert math.isfinite(metrics["val_elbo"])
    assert metrics["train_loss"] == pytest.approx(ref_loss, rel=1e-5), "same first loss as without DeepSpeed"

    saved = load_file(result.model_dir / "model.safetensors")
    assert all(v.numel() > 0 for v in saved.values()), "ZeRO-3's gathered weights are saved whole"
    assert not zero3_left_on, "the stage leaves no ZeRO-3 flag behind (later loads would be partitioned)"

    # the saved model folder loads, has moved away from the initial weights, and is the plain step's model
    got, init = weights(result.model_dir), weights(inputs["init"])
    assert got.keys() == ref_weights.keys()
    moved = max(float((got[k] - init[k]).abs().max()) for k in got)
    assert moved > 1e-4, "the optimizer step changed nothing"
    for key in got:
        torch.testing.assert_close(got[key], ref_weights[key], rtol=1e-4, atol=1e-5, msg=key)
    model = ModernBertForMaskedLM.from_pretrained(result.model_dir).eval()
    tokenizer = load_tokenizer(result.model_dir)  # the folder carries its tokenizer
    ids = tokenizer("the red cat sat on the", return_tensors="pt")["input_ids"]
    ids[0, -1] = special_token_ids(tokenizer)["mask"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("path", [_case(p) for p in CONFIGS])
def test_one_block_diffusion_step_on_cpu(path, inputs, block_reference, tmp_path):
    """Block-causal training (noisy and clean copies side by side under the block mask) under every
    ZeRO config: same loss and weights as the plain step, and the folder records its block size."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dgpt_core.generation.options import trained_block_size

    ref_loss, ref_weights = block_reference
    probe = OptimizerProbe()
    result = one_step(inputs, tmp_path / path.stem, path.stem, probe, tuple(BLOCKS))
    unset_hf_deepspeed_config()
    assert zero_in_force(probe.optimizer) == (_zero(path)["stage"], _offloads(path))
    assert result.metrics["steps"] == 1 and math.isfinite(result.metrics["val_elbo"])
    assert result.metrics["train_loss"] == pytest.approx(ref_loss, rel=1e-5)
    got = weights(result.model_dir)
    for key in got:
        torch.testing.assert_close(got[key], ref_weights[key], rtol=1e-4, atol=1e-5, msg=key)
    assert trained_block_size(ModernBertForMaskedLM.from_pretrained(result.model_dir)) == 8


RL_STEP = ["rl.max_steps=1", "rl.task=skills", "rl.max_prompts=2", "rl.per_device_batch_size=2", "rl.group_size=2",
           "rl.learning_rate=1e-3", "rl.logging_steps=1", "rl.save_steps=null", "rl.use_cpu=true"]


def distinct_characters(_item, text: str) -> float:
    """A reward the untrained model's answers differ in (the skills' exact match is 0 for all of them,
    so every group would be flat and the update zero)."""
    return len(set(text)) / 10


def rl_step(inputs: dict[str, Path], out: Path, deepspeed: str | None, probe: OptimizerProbe | None = None):
    from dgpt_core.rlhf.stage import train_rl_stage

    run = load_run_config("ci", [*TINY, *RL_STEP, f"rl.deepspeed={deepspeed or 'null'}"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dgpt_core.rlhf.stage.reward", distinct_characters)
        return train_rl_stage(run, inputs["tokenizer"], out, inputs["init"], callbacks=[probe] if probe else None,
                              show_progress=False)


@pytest.fixture(scope="module")
def rl_reference(inputs, tmp_path_factory):
    from accelerate.state import AcceleratorState

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_USE_DEEPSPEED", "false")
        AcceleratorState._reset_state(reset_partial_state=True)
        result = rl_step(inputs, tmp_path_factory.mktemp("plain_rl"), None)
        AcceleratorState._reset_state(reset_partial_state=True)
    return result.metrics, weights(result.model_dir)


def _rl_case(path: Path):
    """ZeRO-2 and ZeRO-3 by default (the stages the flow's presets use); ZeRO-1 and the offloads slow."""
    slow = _offloads(path) or _zero(path)["stage"] == 1
    return pytest.param(path, marks=[pytest.mark.slow] if slow else [], id=path.stem)


@pytest.mark.parametrize("path", [_rl_case(p) for p in CONFIGS])
def test_one_rl_step_on_cpu(path, inputs, rl_reference, tmp_path):
    """One GRPO update under every ZeRO config: the rollout is sampled from the (possibly
    partitioned) policy, and reward, loss and updated weights equal the plain update's."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    ref_metrics, ref_weights = rl_reference
    probe = OptimizerProbe()
    result = rl_step(inputs, tmp_path / path.stem, path.stem, probe)
    unset_hf_deepspeed_config()
    assert zero_in_force(probe.optimizer) == (_zero(path)["stage"], _offloads(path))
    assert result.metrics["steps"] == 1
    assert result.metrics["reward_last"] == ref_metrics["reward_last"]
    assert result.metrics["train_loss"] == pytest.approx(ref_metrics["train_loss"], rel=1e-5, abs=1e-7)
    got, init = weights(result.model_dir), weights(inputs["init"])
    assert max(float((got[k] - init[k]).abs().max()) for k in got) > 1e-5, "the update changed nothing"
    for key in got:
        torch.testing.assert_close(got[key], ref_weights[key], rtol=1e-4, atol=1e-5, msg=key)


def test_one_rl_step_with_lora_under_zero2_trains_the_adapter_alone(inputs, tmp_path):
    """The RL stage with a LoRA adapter under ZeRO-2: the update reaches the adapter only, and the
    adapter folder loads as base + adapter."""
    from dgpt_core.models.adapters import is_adapter_folder
    from dgpt_core.rlhf.stage import train_rl_stage

    run = load_run_config("ci", [*TINY, *RL_STEP, "rl.deepspeed=zero2", "rl.adapter.method=lora",
                                 "rl.adapter.save=adapter", "rl.learning_rate=1e-2"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dgpt_core.rlhf.stage.reward", distinct_characters)
        result = train_rl_stage(run, inputs["tokenizer"], tmp_path / "rl", inputs["init"], show_progress=False)
    assert 0 < result.metrics["trainable_parameters"] < result.metrics["parameters"] / 5
    assert result.metrics["tokens_per_second"] > 0 and result.metrics["peak_rss_mb"] > 0
    assert is_adapter_folder(result.model_dir)
    got = ModernBertForMaskedLM.from_pretrained(result.model_dir).state_dict()  # base + the adapter's layers
    for key, value in weights(inputs["init"]).items():
        name = key if key in got else key.replace(".weight", ".base_layer.weight")
        torch.testing.assert_close(got[name].float(), value, rtol=0, atol=0, msg=key)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in got.items()), "the update reached the adapter"
    ids = torch.tensor([[5, 6, 7, 8]])
    adapted = ModernBertForMaskedLM.from_pretrained(result.model_dir).eval()
    plain = ModernBertForMaskedLM.from_pretrained(inputs["init"]).eval()
    with torch.no_grad():
        assert not torch.allclose(adapted(input_ids=ids).logits, plain(input_ids=ids).logits)
