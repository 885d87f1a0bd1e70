"""Model folders saved by earlier versions keep loading and decoding the same.

`fixtures/sft_folder_d01c0a3` was written at commit d01c0a3, before dgpt_core was split into
packages: a random-weight 2-layer SFT folder with the exported sampler files of that time
(`sampling.py`, `sampling_types.py`, ...), its model info, sampler defaults and run config. The
expected answer is what that commit's own sampler generated from it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import ModernBertForMaskedLM

from dgpt_core.config import read_folder_run_config
from dgpt_core.generation import SamplerConfig, TokenIds, generate
from dgpt_core.models import load_tokenizer, read_model_info, read_sampler_defaults

OLD_FOLDER = Path(__file__).parent / "fixtures" / "sft_folder_d01c0a3"
PROMPT = "Where was"
OLD_ANSWER = [683] * 24
"""What d01c0a3's sampler answered to PROMPT with the folder's defaults (random order, 16 steps,
24 tokens, argmax), in 12 forward passes."""


def test_an_old_folder_records_what_it_is():
    info = read_model_info(OLD_FOLDER)
    assert (info.kind, info.answer_canvas, info.long_answer_canvas, info.answer_padding) == ("sft", 24, 64, "eos")
    assert read_sampler_defaults(OLD_FOLDER)["strategy"] == "random"
    run = read_folder_run_config(OLD_FOLDER)
    assert run.preset == "tiny" and run.model.hidden_size == 32


def test_an_old_folder_decodes_as_it_did_with_the_project_sampler():
    model = ModernBertForMaskedLM.from_pretrained(OLD_FOLDER)
    tokenizer = load_tokenizer(OLD_FOLDER)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    config = SamplerConfig(**read_sampler_defaults(OLD_FOLDER))
    result = generate(model, [prompt], TokenIds.from_tokenizer(tokenizer), config)
    assert result.answers == [OLD_ANSWER] and result.nfe == 12


def test_an_old_folder_loads_its_own_pipeline_code():
    from transformers import pipeline

    pipe = pipeline("text-diffusion", model=str(OLD_FOLDER), trust_remote_code=True)
    assert type(pipe).__module__.startswith("transformers_modules")
    out = pipe(PROMPT)
    assert out[0]["nfe"] == 12 and out[0]["generated_text"] == pipe.tokenizer.decode(OLD_ANSWER)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
