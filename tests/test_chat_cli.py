"""`dgpt chat` and `dgpt generate` on tiny saved model folders: history sent per the model info,
messages, empty prompts and over-long prompts."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dgpt_core._cli.generate import chat_context
from dgpt_core.config import ModelConfig
from dgpt_core.generation.pipeline import TextDiffusionPipeline
from dgpt_core.models.backbone import build_model
from dgpt_core.models.export import save_model_folder
from dgpt_core.models.info import ModelInfo
from flows.cli import build_parser

SYSTEM = {"role": "system", "content": "be brief"}


@pytest.fixture(scope="module")
def model(tiny_tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64)
    return build_model(cfg, tiny_tokenizer).eval()


def save(model: torch.nn.Module, tokenizer: Any, out: Path, context_messages: int) -> Path:
    """An SFT folder with a 4-token answer canvas: its defaults decode 4 tokens in 4 steps."""
    info = ModelInfo("sft", schedule="cosine", answer_canvas=4, answer_padding="eos",
                     context_messages=context_messages)
    return save_model_folder(model, tokenizer, out, info=info)


@pytest.fixture(scope="module")
def single_turn(model, tiny_tokenizer, tmp_path_factory) -> Path:
    return save(model, tiny_tokenizer, tmp_path_factory.mktemp("chat") / "single", 1)


@pytest.fixture(scope="module")
def multi_turn(model, tiny_tokenizer, tmp_path_factory) -> Path:
    return save(model, tiny_tokenizer, tmp_path_factory.mktemp("chat") / "multi", 4)


def chat(folder: Path, lines: list[str], monkeypatch, *options: str) -> list[dict[str, Any]]:
    """Run `dgpt chat` on scripted input lines; per pipeline call: the messages, the call options,
    the pipeline's sampler defaults and the answer it returned."""
    calls: list[dict[str, Any]] = []
    original = TextDiffusionPipeline.__call__

    def spy(self, inputs, **kwargs) -> Iterator[dict[str, Any]]:
        call = {"messages": [dict(m) for m in inputs], "kwargs": kwargs,
                "defaults": dict(self._forward_params)}
        calls.append(call)
        updates = original(self, inputs, **kwargs)  # checks and warns now, like the pipeline

        def record() -> Iterator[dict[str, Any]]:
            for update in updates:
                call["answer"] = update["generated_text"]
                yield update

        return record()

    script = iter(lines)
    monkeypatch.setattr(TextDiffusionPipeline, "__call__", spy)
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(script))
    args = build_parser(["generate", "chat"]).parse_args(["chat", str(folder), *options])
    assert args.func(args) == 0
    return calls


def test_single_turn_model_gets_only_the_latest_message(single_turn, monkeypatch, capsys):
    lines = ["what is one", "and two", "/reset", "/exit"]
    calls = chat(single_turn, lines, monkeypatch, "--system", "be brief")
    assert [c["messages"] for c in calls] == [[{"role": "user", "content": "what is one"}],
                                             [{"role": "user", "content": "and two"}]]
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "single-turn model: each message is answered on its own (the history is not sent)"
    assert out.count("history cleared") == 1


def test_multi_turn_model_gets_the_history_it_was_trained_on(multi_turn, monkeypatch, capsys):
    calls = chat(multi_turn, ["what is one", "and two", "and three", "/reset", "four", "/exit"], monkeypatch,
                 "--system", "be brief")
    first, second, third, after_reset = (c["messages"] for c in calls)
    answers = [c["answer"] for c in calls]
    assert first == [SYSTEM, {"role": "user", "content": "what is one"}]
    assert second == [SYSTEM, {"role": "user", "content": "what is one"},
                      {"role": "assistant", "content": answers[0]}, {"role": "user", "content": "and two"}]
    # 4 messages before an answer in SFT: the system message and the last 3
    assert third == [SYSTEM, {"role": "user", "content": "and two"},
                     {"role": "assistant", "content": answers[1]}, {"role": "user", "content": "and three"}]
    assert after_reset == [SYSTEM, {"role": "user", "content": "four"}]
    assert "single-turn" not in capsys.readouterr().out
    # no sampler option on the command line: the folder's defaults decide
    assert all(c["kwargs"] == {"stream": True} for c in calls)
    defaults = {"schedule": "cosine", "t_eps": 1e-3, "strategy": "confidence", "steps": 4, "max_new_tokens": 4,
                "temperature": 0.0}
    assert calls[0]["defaults"] == defaults


def test_chat_context_trims_to_the_sft_context():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
               {"role": "user", "content": "c"}]
    assert chat_context(history, "s", None) == [{"role": "system", "content": "s"}, *history]
    assert chat_context(history, "s", 1) == history[-1:]
    assert chat_context(history, "s", 2) == [{"role": "system", "content": "s"}, history[-1]]
    assert chat_context(history, None, 2) == history[-2:]
    assert chat_context(history, None, 10) == history


def test_chat_prints_the_cut_warning_as_one_line(multi_turn, monkeypatch, capsys):
    long = " ".join(["the red cat sat on the mat ."] * 12)
    calls = chat(multi_turn, [long, "/exit"], monkeypatch)
    assert len(calls) == 1 and "answer" in calls[0]
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if line.startswith("warning:")]
    assert len(warned) == 1
    assert "exceeds the model's maximum length of 64" in warned[0] and "prompt tokens are cut" in warned[0]


@pytest.mark.parametrize("prompt", ["", "   "])
def test_generate_refuses_an_empty_prompt(single_turn, capsys, prompt):
    with pytest.raises(SystemExit) as exit_info:
        build_parser(["generate", "chat"]).parse_args(["generate", str(single_turn), "--prompt", "hi", "--prompt", prompt])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["dgpt generate: error: argument --prompt: empty prompt: give some text to answer"]
