"""bench.compile on the ci preset (random weights): the result's layout, positive timings and
ratios, `kept` following from them, and an honest error when compiling fails. The real compile
takes minutes on a CPU (about a minute per graph on two cores), so only that test is slow; the
others stand an identity for `torch.compile` in, which runs every other line."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bench.common import SIZES, load_subject
from bench.compile import KEEP_COMPILE_S, KEEP_SPEEDUP, compile_suite

SIZES_CI = dataclasses.replace(SIZES["ci"], reps=1, skills_per_skill=1)


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return load_subject(None, "ci", tmp_path_factory.mktemp("compile"))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def check_layout(result: dict, subject) -> None:
    run = subject.run
    sampling, training = result["sampling"], result["training"]
    assert sampling["workload"] == "skills" and sampling["items"] == len(run.data.skills.skills)
    for key in ("eager_tokens_per_s", "compiled_tokens_per_s", "speedup"):
        assert positive(sampling[key])
    assert sampling["speedup"] == pytest.approx(sampling["compiled_tokens_per_s"] / sampling["eager_tokens_per_s"])
    assert (training["batch"], training["seq_len"]) == (run.pretrain.per_device_batch_size, run.model.max_seq_len)
    for key in ("eager_step_s", "compiled_step_s", "speedup"):
        assert positive(training[key])
    assert training["speedup"] == pytest.approx(training["eager_step_s"] / training["compiled_step_s"])
    for use in ("sampling", "training"):
        part = result[use]
        assert math.isfinite(part["compile_s"])
        assert result["kept"][use] == (part["speedup"] > KEEP_SPEEDUP and part["compile_s"] < KEEP_COMPILE_S)


def test_layout_ratios_and_kept_with_an_identity_compile(subject, one_thread, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **options: module)
    result = compile_suite(subject, SIZES_CI)
    check_layout(result, subject)
    assert result["sampling"]["identical_outputs"] is True  # the same eager backbone twice


def test_a_failing_compile_is_reported_not_hidden(subject, monkeypatch):
    def broken(module, **options):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    backbone = subject.model.model
    result = compile_suite(subject, SIZES_CI)
    want = {"error": "RuntimeError: no C++ compiler found"}
    assert result["sampling"] == result["training"] == want
    assert result["kept"] == {"sampling": False, "training": False}
    assert subject.model.model is backbone


@pytest.mark.slow
def test_a_real_compile(subject, one_thread):
    backbone = subject.model.model
    result = compile_suite(subject, SIZES_CI)
    assert "error" not in result["sampling"] and "error" not in result["training"], result
    check_layout(result, subject)
    assert result["sampling"]["compile_s"] > 0 and result["training"]["compile_s"] > 0
    assert subject.model.model is backbone  # the model under test is eager again


def test_the_report_shows_each_use_or_its_error():
    from bench.report import compile_section

    compiled = {"device": "cpu", "threads": 2, "torch": "x", "kept": {"sampling": True, "training": False},
                "sampling": {"compile_s": 30.0, "eager_tokens_per_s": 100.0, "compiled_tokens_per_s": 120.0,
                             "speedup": 1.2},
                "training": {"error": "RuntimeError: no compiler"}}
    text = "\n".join(compile_section(compiled))
    assert "| sampling | tokens/s | 30.000 | 100.000 | 120.000 | 1.200 | True |" in text
    assert "| training | RuntimeError: no compiler |  |  |  |  | False |" in text
