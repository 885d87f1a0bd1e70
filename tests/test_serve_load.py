"""The bounded load test of `dgpt serve` (slow): 32 concurrent streaming clients for 60 seconds
against the trained `tiny` SFT model; no errors, latency and tokens/s reported, batching visible
in /metrics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.serve_load import run_load
from deploy.serve.process import started_server

ROOT = Path(__file__).resolve().parents[1]


def served_model() -> Path:
    """runs/latest/models/sft of the checkout (made by ./scripts/run.sh), else $DGPT_SERVE_MODEL."""
    checkout = ROOT / "runs" / "latest" / "models" / "sft"
    if (checkout / "config.json").is_file():
        return checkout
    named = os.environ.get("DGPT_SERVE_MODEL")
    if named and (Path(named) / "config.json").is_file():
        return Path(named)
    pytest.skip("no trained model to load-test: run ./scripts/run.sh (writes runs/latest/models/sft) "
                "or set DGPT_SERVE_MODEL to a model folder")


@pytest.mark.slow
def test_32_streaming_clients_for_60_seconds_without_errors(tmp_path):
    with started_server(served_model(), log=tmp_path / "serve.log") as url:
        report = run_load(url, clients=32, seconds=60)
    print("\n" + report.table())
    assert report.errors == 0, report.error_examples
    assert report.requests >= 32 and len(report.latencies) == report.requests
    assert report.completion_tokens > 0 and report.p95 >= report.p50 > 0
    assert report.batches_over_one() > 0, f"no batch of more than one sequence: {report.batch_histogram}"
