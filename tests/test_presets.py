"""Every preset loads, validates, holds exactly what its YAML says and round-trips; the offline
presets reach for nothing on the Hub and the Hub presets name their datasets; the global seed is
inherited; bad keys and values fail naming them; `--set` overrides land on their field."""

from __future__ import annotations

import argparse
import typing
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from dgpt_core.config import (
    PRESET_DIR,
    RunConfig,
    add_config_arguments,
    available_presets,
    load_run_config,
    read_folder_run_config,
)
from dgpt_core.data.sources import resolve

PRESETS = available_presets()


def test_the_documented_presets_ship():
    assert {"ci", "tiny", "tinystories", "fineweb"} <= set(PRESETS)
    assert PRESETS == sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _leaves(tree: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(key path, value) of every leaf of a YAML tree; list items are indexed (a list of sections,
    like data sources, is compared item by item on the keys the YAML gives)."""
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items() for leaf in _leaves(value, (*path, key))]
    if isinstance(tree, list) and any(isinstance(item, dict) for item in tree):
        items = [leaf for i, item in enumerate(tree) for leaf in _leaves(item, (*path, i))]
        return [((*path, "len"), len(tree)), *items]
    return [(path, tree)]


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = len(tree) if key == "len" else tree[key]
    return tree


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_holds_what_its_yaml_says_and_round_trips(preset, tmp_path):
    config = load_run_config(preset)
    assert config.preset == preset
    dumped = config.model_dump(mode="json")
    written = yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())
    leaves = _leaves(written)
    assert len(leaves) > 20
    for path, value in leaves:
        assert _at(dumped, path) == value, f"{preset}.yaml: {'.'.join(map(str, path))}"
    # the resolved config saved beside outputs reads back as the same config, by every reader
    saved = config.save_yaml(tmp_path / "run_config.yaml")
    assert RunConfig.from_yaml(saved) == config
    assert load_run_config(saved) == config
    assert read_folder_run_config(tmp_path) == config
    assert yaml.safe_load(saved.read_text()) == dumped


@pytest.mark.parametrize("preset", ["ci", "tiny"])
def test_the_ci_and_tiny_presets_need_nothing_from_the_hub(preset):
    config = load_run_config(preset)
    sources = [*config.data.pretrain.sources, *config.data.sft.sources]
    assert sources and all(resolve(s).origin == "builtin" and resolve(s).hub_id is None for s in sources)
    assert config.tokenizer.kind == "bpe"  # trained here, not downloaded
    assert config.model.init_from is None and config.pretrain.init_from is None and config.sft.init_from is None
    assert config.eval.standard_tasks() == []  # only the local eval tasks (lm-eval Hub tasks download data)
    assert config.publish.repo_id is None  # publish is a dry run
    assert config.pretrain.use_cpu and config.sft.use_cpu


@pytest.mark.parametrize(("preset", "pretrain", "sft"), [
    ("fineweb", ["HuggingFaceFW/fineweb"], ["HuggingFaceTB/smol-smoltalk",
                                            "HuggingFaceTB/everyday-conversations-llama3.1-2k",
                                            "nvidia/Nemotron-Instruction-Following-Chat-v1"]),
    ("tinystories", ["roneneldan/TinyStories"], ["HuggingFaceTB/smol-smoltalk"]),
])
def test_the_hub_presets_name_their_hub_datasets_and_tokenizer(preset, pretrain, sft):
    config = load_run_config(preset)
    for sources, want in ((config.data.pretrain.sources, pretrain), (config.data.sft.sources, sft)):
        resolved = [resolve(s) for s in sources]
        assert [r.origin for r in resolved] == ["hub"] * len(want) and [r.hub_id for r in resolved] == want
    assert (config.tokenizer.kind, config.tokenizer.name_or_path) == ("pretrained", "gpt2")


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


# --------------------------------------------------------------------------- seeds


def _seeds(config: RunConfig) -> dict[str, int]:
    return {"data": config.data.seed, "skills": config.data.skills.seed, "world": config.data.world.seed,
            "pretrain": config.pretrain.seed,
            "pretrain.diffusion": config.pretrain.diffusion.seed, "sft": config.sft.seed,
            "sft.diffusion": config.sft.diffusion.seed, "rl": config.rl.seed, "eval": config.eval.seed}


def test_unset_seeds_follow_the_global_seed_and_an_explicit_one_wins():
    assert set(_seeds(load_run_config("ci", ["seed=5"])).values()) == {5}
    config = load_run_config("ci", ["seed=5", "sft.seed=2", "data.skills.seed=9", "data.world.seed=7"])
    assert _seeds(config) == {"data": 5, "skills": 9, "world": 7, "pretrain": 5, "pretrain.diffusion": 5, "sft": 2,
                              "sft.diffusion": 2, "rl": 5, "eval": 5}, "a collator follows its stage"
    config = load_run_config("ci", ["seed=5", "sft.diffusion.seed=3"])
    assert (config.sft.seed, config.sft.diffusion.seed) == (5, 3)
    assert RunConfig.model_validate(config.model_dump()) == config
    assert [section.seed for section, _ in config.seed_inheritance()] == [5, 5, 5, 5, 5, 5, 3, 5, 5]


def test_a_preset_file_with_its_own_seeds(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("seed: 4\nsft:\n  seed: 9\n")
    config = load_run_config(path)
    assert config.preset == "mine"
    assert _seeds(config) == {"data": 4, "skills": 4, "world": 4, "pretrain": 4, "pretrain.diffusion": 4, "sft": 9,
                              "sft.diffusion": 9, "rl": 4, "eval": 4}
    assert _seeds(load_run_config(path, ["seed=1"]))["pretrain"] == 1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("override", "named"), [
    ("sft.lr=1", "sft.lr"),  # unknown key
    ("pretrain.diffusion.bogus=1", "pretrain.diffusion.bogus"),
    ("pretrain.max_steps=-1", "pretrain.max_steps"),  # bad values
    ("data.validation_fraction=2", "data.validation_fraction"),
    ("eval_models=[final]", "eval_models"),
    ("model.num_heads=3", "num_heads=3 must divide hidden_size=256"),
    ("tracking.enabled=maybe", "tracking.enabled"),
])
def test_a_bad_override_fails_naming_the_key_the_preset_and_the_override(override, named):
    with pytest.raises(ValueError) as err:
        load_run_config("tiny", [override])
    message = str(err.value)
    assert named in message and str(PRESET_DIR / "tiny.yaml") in message and repr(override) in message


def test_a_bad_preset_file_fails_naming_the_file_and_the_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(ValueError, match=r"model\.hiden_size") as err:
        load_run_config(path)
    assert str(path) in str(err.value)


def test_malformed_overrides_and_unknown_presets_fail_clearly():
    with pytest.raises(ValueError, match="key.path=value"):
        load_run_config("tiny", ["sft.learning_rate"])
    with pytest.raises(ValueError, match="'seed' is not a section"):
        load_run_config("tiny", ["seed.value=1"])
    with pytest.raises(FileNotFoundError, match=r"unknown preset 'nope': use one of \['ci', 'fineweb'"):
        load_run_config("nope")


# --------------------------------------------------------------------------- --set


def test_set_overrides_from_the_command_line_land_on_their_fields():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args([
        "--preset", "ci", "--set", "sft.learning_rate=1e-4", "--set", "model.num_layers=3",
        "--set", "sft.diffusion.edit_start=0.5", "--set", "pretrain.deepspeed=null", "--set", "tracking.enabled=false",
        "--set", "eval.strategies=[random]", "--set", "data.sft.sources=[{name: skills, weight: 2}]",
        "--set", "model.num_layers=4",
    ])
    config = load_run_config(args.preset, args.overrides)
    base = load_run_config("ci")
    assert config.sft.learning_rate == 1e-4 and base.sft.learning_rate == 1e-3
    assert config.model.num_layers == 4, "the last --set of a key wins"
    assert config.pretrain.deepspeed is None and base.pretrain.deepspeed == "zero2"
    assert config.tracking.enabled is False and config.eval.strategies == ["random"]
    assert [(s.name, s.weight) for s in config.data.sft.sources] == [("skills", 2.0)]
    # a nested override changes that one field: its siblings keep the preset's values
    assert config.sft.diffusion.edit_start == 0.5
    others = {"exclude": {"edit_start"}}
    assert config.sft.diffusion.model_dump(**others) == base.sft.diffusion.model_dump(**others)
    assert config.pretrain == base.pretrain.model_copy(update={"deepspeed": None})
    changed = {k for k, v in config.model_dump().items() if v != base.model_dump()[k]}
    assert changed == {"sft", "model", "pretrain", "tracking", "eval", "data"}
    assert config.model.model_dump(exclude={"num_layers"}) == base.model.model_dump(exclude={"num_layers"})


def test_the_main_job_trains_deletion_during_sft():
    sft = load_run_config("tiny").sft.diffusion
    assert sft.edit_start == 0.0 and sft.insert_prob > 0
