"""`bench.memory`'s cases on the ci preset's model shape: gradient checkpointing lowers the saved
activations and keeps the step's loss path, and LoRA lowers the trained parameters and the
gradient and AdamW memory."""

import argparse

import pytest

from bench.memory import COLUMNS, measure

ARGS = argparse.Namespace(device="cpu", steps=1, fineweb_layers=2, fineweb_batch=2, fineweb_seq_len=512)


@pytest.fixture(scope="module")
def cases() -> dict[tuple[str, bool], dict]:
    return {(tuning, checkpointing): measure("ci", tuning, checkpointing, ARGS)
            for tuning in ("full", "lora") for checkpointing in (False, True)}


def test_every_case_fills_the_table_columns(cases):
    for row in cases.values():
        assert set(COLUMNS) <= set(row)
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_rss_over_model_mb"] is not None
        assert row["forward_held_mb"] is None and row["gpu_peak_allocated_mb"] is None  # CUDA only


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_checkpointing_lowers_the_saved_activations(cases, tuning):
    plain, checkpointed = cases[tuning, False], cases[tuning, True]
    assert checkpointed["saved_activations_mb"] < 0.7 * plain["saved_activations_mb"]
    assert checkpointed["trained_params_m"] == plain["trained_params_m"]


def test_lora_trains_a_small_share_and_needs_less_optimizer_memory(cases):
    full, lora = cases["full", False], cases["lora", False]
    assert lora["params_m"] > full["params_m"]  # the base plus the adapter
    assert 0 < lora["trained_params_m"] < full["trained_params_m"] / 5
    assert lora["grads_adamw_mb"] < full["grads_adamw_mb"] / 5
