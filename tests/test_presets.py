"""Every preset parses and validates; every config field is documented; overrides are checked."""

import typing

import pytest
from pydantic import BaseModel

from dgpt_core.run_config import RunConfig, available_presets, load_run_config


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_parses_and_round_trips(preset, tmp_path):
    config = load_run_config(preset)
    assert config.preset == preset
    assert RunConfig.from_yaml(config.save_yaml(tmp_path / "resolved.yaml")) == config


def test_the_expected_presets_ship():
    assert {"ci", "tiny", "tinystories", "fineweb"} <= set(available_presets())


def _models(model: type[BaseModel], seen: set) -> list[type[BaseModel]]:
    if model in seen:
        return []
    seen.add(model)
    found = [model]
    for field in model.model_fields.values():
        for arg in [field.annotation, *typing.get_args(field.annotation)]:
            for inner in [arg, *typing.get_args(arg)]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    found += _models(inner, seen)
    return found


def test_every_config_field_has_a_docstring():
    undocumented = [f"{m.__name__}.{name}" for m in _models(RunConfig, set())
                    for name, field in m.model_fields.items() if not (field.description or "").strip()]
    assert not undocumented, undocumented


def test_overrides_are_applied_and_validated():
    config = load_run_config("tiny", ["sft.learning_rate=1e-4", "model.num_layers=2", "sft.diffusion.edit_start=0.5"])
    assert config.sft.learning_rate == 1e-4 and config.model.num_layers == 2 and config.sft.diffusion.edit_start == 0.5
    with pytest.raises(ValueError, match="sft.lr"):
        load_run_config("tiny", ["sft.lr=1"])
    with pytest.raises(ValueError, match="num_heads"):
        load_run_config("tiny", ["model.num_heads=3"])
    with pytest.raises(ValueError, match="key.path=value"):
        load_run_config("tiny", ["sft.learning_rate"])
    with pytest.raises(FileNotFoundError, match="unknown preset"):
        load_run_config("nope")


def test_the_global_seed_is_the_default_of_every_seed_and_a_section_seed_overrides_it():
    config = load_run_config("ci", ["seed=5"])
    assert [section.seed for section, _ in config.seed_inheritance()] == [5] * 7
    config = load_run_config("ci", ["seed=5", "sft.seed=2", "data.skills.seed=9"])
    seeds = {id(section): section.seed for section, _ in config.seed_inheritance()}
    assert seeds[id(config.sft)] == seeds[id(config.sft.diffusion)] == 2, "the collator follows its stage"
    assert config.data.skills.seed == 9 and config.data.seed == config.pretrain.seed == config.eval.seed == 5
    assert RunConfig.model_validate(config.model_dump()) == config


def test_the_main_job_trains_deletion_during_sft():
    sft = load_run_config("tiny").sft.diffusion
    assert sft.edit_start == 0.0 and sft.insert_prob > 0
