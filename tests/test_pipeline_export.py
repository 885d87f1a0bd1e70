"""The text-diffusion pipeline, the exported model folder (loaded in a fresh process) and the CLI."""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from dgpt_core._cli.generate import NOT_ON_COMMAND_LINE, sampler_options
from dgpt_core.config import ModelConfig
from dgpt_core.generation import pipeline as pipeline_module
from dgpt_core.generation.pipeline import TextDiffusionPipeline, render
from dgpt_core.generation.sampler import SamplerConfig
from dgpt_core.models.backbone import build_model
from dgpt_core.models.export import PIPELINE_FILES, save_model_folder
from dgpt_core.models.tokenizer import train_bpe_tokenizer
from flows.cli import build_parser

WORDS = "the cat dog sat on a mat hello world how are you fine thanks red blue one two three".split()
DEFAULTS = {"strategy": "confidence", "steps": 4, "max_new_tokens": 8}
CHAT = [{"role": "user", "content": "hello how are you"}]
CLI_OPTIONS = {
    "strategy": (["--strategy", "margin"], "margin"),
    "position_selection": (["--position-selection", "sample"], "sample"),
    "position_temperature": (["--position-temperature", "0.5"], 0.5),
    "threshold": (["--threshold", "0.5"], 0.5),
    "eb_gamma": (["--eb-gamma", "0.5"], 0.5),
    "remask": (["--remask", "conf"], "conf"),
    "remask_eta": (["--remask-eta", "0.1"], 0.1),
    "no_repeat_ngram_size": (["--no-repeat-ngram-size", "2"], 2),
    "ngram_penalty": (["--ngram-penalty", "1.5"], 1.5),
    "schedule": (["--schedule", "cosine"], "cosine"),
    "t_eps": (["--t-eps", "0.01"], 0.01),
    "steps": (["--steps", "3"], 3),
    "max_new_tokens": (["--max-new-tokens", "6"], 6),
    "temperature": (["--temperature", "0.5"], 0.5),
    "top_p": (["--top-p", "0.8"], 0.8),
    "seed": (["--seed", "7"], 7),
    "edit": (["--edit"], True),
    "edit_threshold": (["--edit-threshold", "0.5"], 0.5),
    "edit_rate": (["--edit-rate", "0.5"], 0.5),
    "stop_token_ids": (["--stop-token-ids", "4", "0"], (4, 0)),
    "block_size": (["--block-size", "3"], 3),
    "canvas_blocks": (["--canvas-blocks", "2"], 2),
    "prefix_cache": (["--prefix-cache"], True),
}
"""Per sampler option of `dgpt generate`: arguments giving it a value other than the defaults, and that value."""


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(300)]
    return train_bpe_tokenizer(texts, vocab_size=256)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64)
    return build_model(cfg, tokenizer).eval()


@pytest.fixture(scope="module")
def pipe(model, tokenizer) -> TextDiffusionPipeline:
    return transformers.pipeline("text-diffusion", model=model, tokenizer=tokenizer, device="cpu")


@pytest.fixture(scope="module")
def folder(model, tokenizer, tmp_path_factory) -> Path:
    return save_model_folder(model, tokenizer, tmp_path_factory.mktemp("export") / "model", DEFAULTS)


def test_string_input(pipe):
    out = pipe("the cat", steps=4, max_new_tokens=8, seed=0)
    assert isinstance(pipe, TextDiffusionPipeline)
    assert len(out) == 1 and set(out[0]) == {"generated_text", "nfe", "stopped"}
    assert isinstance(out[0]["generated_text"], str) and 1 <= out[0]["nfe"] <= 4


def test_chat_goes_through_the_template(pipe, tokenizer):
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = pipe.preprocess([CHAT])["prompt_ids"][0]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(pipe(CHAT, steps=2, max_new_tokens=4, seed=0)) == 1


def test_batch_of_strings_and_chats(pipe):
    outs = pipe(
        ["the cat", CHAT, "one two three four five"], strategy="margin", steps=2, max_new_tokens=6, seed=0
    )
    assert len(outs) == 3 and all(len(o) == 1 and "generated_text" in o[0] for o in outs)
    assert pipe(["a", "b", "c"], batch_size=2, steps=2, max_new_tokens=4, seed=0)[2][0]["nfe"] >= 1


def test_stream_ends_in_the_final_text(pipe):
    options = {"strategy": "confidence", "steps": 3, "max_new_tokens": 6, "seed": 0, "stop_token_ids": []}
    updates = list(pipe("the dog", stream=True, **options))
    assert [u["step"] for u in updates] == [0, 1, 2, 3] and updates[-1]["done"]
    assert updates[0]["generated_text"] == "░" * 6 and updates[0]["token_ids"] == [pipe.token_ids.mask] * 6
    assert updates[-1]["generated_text"] == pipe("the dog", **options)[0]["generated_text"]
    batch = list(pipe(["a", "b"], stream=True, mask_symbol="_", **options))
    assert batch[0]["generated_text"] == ["_" * 6] * 2


def test_render_shows_masks_and_cuts_at_stop(tokenizer, pipe):
    ids = pipe.token_ids
    cat, dog = (
        tokenizer("cat", add_special_tokens=False)["input_ids"],
        tokenizer(" dog", add_special_tokens=False)["input_ids"],
    )
    canvas = [*cat, ids.mask, ids.mask, *dog, ids.im_end, *cat]
    assert render(tokenizer, canvas, ids.mask, ids.default_stops) == "cat░░ dog"


def test_unknown_option_is_an_error(pipe):
    with pytest.raises(TypeError, match="temprature"):
        pipe("the cat", temprature=0.5)
    with pytest.raises(TypeError):
        save_model_folder(pipe.model, pipe.tokenizer, "/nonexistent/never", {"bogus": 1})


def test_empty_prompt_is_an_error(pipe):
    for prompt in ("", "  \n", [{"role": "user", "content": " "}],
                   [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": ""}]):
        with pytest.raises(ValueError, match="empty prompt: give some text"):
            pipe(prompt, steps=2, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"empty prompt \(inputs \[1\]\)"):
        pipe(["the cat", ""], stream=True, steps=2, max_new_tokens=4)


def test_prompt_over_the_window_warns_and_still_generates(pipe, tokenizer):
    long = " ".join(["the cat sat on a mat"] * 4)
    n = len(tokenizer(long, add_special_tokens=False)["input_ids"])
    assert n > 64
    with pytest.warns(UserWarning, match=rf"prompt of {n} tokens \+ canvas of 8 exceeds the model's maximum "
                                         rf"length of 64: the oldest {n + 8 - 64} prompt tokens are cut"):
        out = pipe(long, steps=2, max_new_tokens=8, seed=0)
    assert isinstance(out[0]["generated_text"], str)
    with pytest.warns(UserWarning, match=rf"prompt 1 of {n} tokens \+ canvas of 4 .* oldest {n + 4 - 64} "):
        states = list(pipe(["the cat", long], stream=True, steps=2, max_new_tokens=12, block_size=4, seed=0))
    assert states[-1]["done"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("the cat", steps=2, max_new_tokens=8, seed=0)


def test_pipeline_files_import_only_torch_transformers_and_each_other():
    source = Path(__file__).parents[1] / "dgpt_core" / "generation"
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    assert {p.name for p in source.glob("*.py")} - {"__init__.py"} == set(PIPELINE_FILES)
    for name in PIPELINE_FILES:
        tree = ast.parse((source / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {(node.module or "").split(".")[0]}
                if node.level:
                    assert f"{node.module}.py" in PIPELINE_FILES, (name, node.module)
            else:
                continue
            assert roots <= allowed, (name, roots - allowed)


def test_folder_contents(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", *PIPELINE_FILES} <= names
    assert "schedules.py" in PIPELINE_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"]["text-diffusion"]["impl"] == "pipeline.TextDiffusionPipeline"
    assert config["sampler_defaults"] == DEFAULTS
    source = Path(__file__).parents[1] / "dgpt_core" / "generation"
    assert (folder / "sampler.py").read_text() == (source / "sampler.py").read_text()


def test_fresh_process_pipeline_from_folder(folder, tmp_path):
    script = textwrap.dedent(
        f"""
        import json, sys, transformers
        pipe = transformers.pipeline("text-diffusion", model={str(folder)!r}, trust_remote_code=True)
        out = pipe("the cat", seed=0)
        chat = pipe([{{"role": "user", "content": "hello"}}], seed=0, strategy="random")
        states = list(pipe("the dog", stream=True, seed=0))
        print(json.dumps({{"module": type(pipe).__module__, "dgpt_core": "dgpt_core" in sys.modules,
                           "out": out, "chat": chat, "n_states": len(states)}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf")
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules") and not result["dgpt_core"]
    assert result["out"][0]["nfe"] == DEFAULTS["steps"] and isinstance(
        result["out"][0]["generated_text"], str
    )
    assert set(result["chat"][0]) == {"generated_text", "nfe", "stopped"}
    assert result["n_states"] == DEFAULTS["steps"] + 1


def test_cli_generate(folder, capsys):
    args = build_parser(["generate", "chat"]).parse_args(
        ["generate", str(folder), "--prompt", "hi", "--prompt", "the cat", "--seed", "0"]
    )
    assert args.func(args) == 0
    assert capsys.readouterr().err.count("[nfe=4 stopped=") == 2  # one answer per prompt
    args = build_parser(["generate", "chat"]).parse_args(
        [
            "generate",
            str(folder),
            "--prompt",
            "hi",
            "--raw",
            "--stream",
            "--block-size",
            "4",
            "--max-new-tokens",
            "12",
        ]
    )
    assert args.func(args) == 0
    args = build_parser(["generate", "chat"]).parse_args(["generate", str(folder), "--prompt", "hi", "--strategy", "threshold",
                              "--threshold", "0.5", "--steps", "4", "--block-size", "4", "--prefix-cache"])
    assert args.func(args) == 0
    assert "[nfe=" in capsys.readouterr().err


def test_every_sampler_field_is_a_cli_option_that_reaches_the_sampler(folder, monkeypatch):
    """Each SamplerConfig field is a `dgpt generate` option or excluded on purpose; the options given
    make the config the sampler runs with, and those not given leave the folder's defaults alone."""
    fields = {f.name for f in dataclasses.fields(SamplerConfig)}
    assert set(CLI_OPTIONS) | NOT_ON_COMMAND_LINE == fields and not set(CLI_OPTIONS) & NOT_ON_COMMAND_LINE
    configs = []
    original = pipeline_module.generate
    monkeypatch.setattr(pipeline_module, "generate",
                        lambda model, prompts, ids, config: configs.append(config) or original(model, prompts, ids, config))
    parser = build_parser(["generate", "chat"])
    given = [arg for argv, _ in CLI_OPTIONS.values() for arg in argv]
    for argv in ([], given):
        args = parser.parse_args(["generate", str(folder), "--prompt", "hi", *argv])
        assert args.func(args) == 0
    assert configs == [SamplerConfig(**DEFAULTS), SamplerConfig(**{n: v for n, (_, v) in CLI_OPTIONS.items()})]


def test_cli_chat_keeps_history(folder, monkeypatch, capsys):
    seen = []
    original = TextDiffusionPipeline.preprocess

    def spy(self, inputs):
        seen.append([list(i) for i in inputs])
        return original(self, inputs)

    monkeypatch.setattr(TextDiffusionPipeline, "preprocess", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nhow are you\n/reset\nbye\n/exit\n"))
    args = build_parser(["generate", "chat"]).parse_args(["chat", str(folder), "--steps", "2", "--system", "be brief"])
    assert args.func(args) == 0
    roles = [[m["role"] for m in chat] for (chat,) in seen]
    assert roles == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert capsys.readouterr().out.count("bot> ") == 3


def test_strategy_option_takes_a_decoding_method_that_other_options_override(folder, capsys):
    parser = build_parser(["generate", "chat"])
    args = parser.parse_args(["generate", str(folder), "--prompt", "hi", "--strategy", "confidence+guard",
                              "--no-repeat-ngram-size", "4", "--steps", "4"])
    assert sampler_options(args) == {"strategy": "confidence", "no_repeat_ngram_size": 4, "steps": 4}
    assert args.func(args) == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", str(folder), "--prompt", "hi", "--strategy", "confidence+nope"])
    assert "unknown decoding method 'confidence+nope'" in capsys.readouterr().err


def test_an_exported_block_model_decodes_block_by_block_without_the_project(model, tokenizer, tmp_path):
    """A block-causal folder, loaded with trust_remote_code in a process without dgpt_core, decodes
    with its own defaults (exact cache, blocks of its trained size) as the library does."""
    from dgpt_core.generation.sampler import TokenIds, generate
    from dgpt_core.models.info import ModelInfo

    defaults = {"strategy": "threshold", "threshold": 0.9, "steps": 4, "max_new_tokens": 12, "temperature": 0.0,
                "stop_token_ids": []}
    folder = save_model_folder(model, tokenizer, tmp_path / "blocks", defaults, ModelInfo("sft", block_size=4))
    script = textwrap.dedent(
        f"""
        import json, sys, transformers
        pipe = transformers.pipeline("text-diffusion", model={str(folder)!r}, trust_remote_code=True)
        out = pipe("the cat")
        states = list(pipe("the cat", stream=True))
        print(json.dumps({{"dgpt_core": "dgpt_core" in sys.modules, "out": out[0], "states": len(states),
                           "streamed": states[-1]["token_ids"]}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(str(folder)).eval()
    prompt = tokenizer("the cat", add_special_tokens=False)["input_ids"]
    local = generate(loaded, [prompt], TokenIds.from_tokenizer(tokenizer), SamplerConfig.of_model(loaded))
    assert not result["dgpt_core"]
    assert result["out"]["generated_text"] == tokenizer.decode(local.answers[0], skip_special_tokens=True)
    assert result["out"]["nfe"] == local.nfe and result["streamed"] == local.answers[0]
    assert 3 <= result["states"] <= 1 + 12  # 12 tokens in 3 blocks of 4, at most 4 steps each
