"""Every `dgpt` error is one line on stderr (plus at most a hint line) and a non-zero exit code,
with no traceback unless `--debug`; each case runs the real command in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/dgpt-model"


def dgpt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m flows.cli ARGS` in a fresh process (offline: conftest put its settings in os.environ)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


CASES = {
    "prepare unknown key": (["prepare", "--set", "nosuch.key=1"], 2, "nosuch: unknown key"),
    "train unknown key": (["train", "--set", "nosuch.key=1"], 2, "nosuch: unknown key"),
    "train bad value": (["train", "--set", "pretrain.max_steps=-1"], 2, "pretrain.max_steps: must be > 0 (got -1)"),
    "train missing preset": (["train", "--preset", "nosuch"], 2, "unknown preset 'nosuch'"),
    "train --set without =": (["train", "--set", "seed"], 2, "not of the form key.path=value"),
    "generate missing folder": (["generate", MISSING, "--prompt", "hi"], 2, f"model folder {MISSING} does not exist"),
    "chat missing folder": (["chat", MISSING], 2, f"model folder {MISSING} does not exist"),
    "chat Hub id offline": (["chat", "nosuch-org/nosuch-model"], 2, "Hub is not reachable"),
    "generate --steps 0": (["generate", MISSING, "--prompt", "hi", "--steps", "0"], 2,
                           "argument --steps: must be >= 1 (got 0)"),
    "generate --max-new-tokens -1": (["generate", MISSING, "--prompt", "hi", "--max-new-tokens", "-1"], 2,
                                     "argument --max-new-tokens: must be >= 1 (got -1)"),
    "chat --threshold 2": (["chat", MISSING, "--threshold", "2"], 2, "argument --threshold: must be in (0, 1] (got 2)"),
}


@pytest.mark.parametrize(("args", "code", "named"), list(CASES.values()), ids=list(CASES))
def test_an_error_is_one_line_and_a_non_zero_exit(args, code, named):
    done = dgpt(*args)
    lines = done.stderr.splitlines()
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert 1 <= len(lines) <= 2, f"one error line and at most a hint, got:\n{done.stderr[-3000:]}"
    assert lines[0].startswith(f"dgpt {args[0]}: ") and named in lines[0], lines


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_the_error_line(where):
    args = ["train", "--set", "seed"]
    done = dgpt(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr and "in parse_override" in done.stderr
    assert done.stderr.splitlines()[-1] == "dgpt train: override 'seed' is not of the form key.path=value"


SHRUNK = ["tracking.enabled=false", "pretrain.max_steps=3", "pretrain.deepspeed=null",
          "data.skills.train_per_skill=20", "data.skills.validation_per_skill=2", "data.skills.test_per_skill=3",
          "data.pretrain.sources=[{name: chitchat, max_items: 50}, {name: skills}]",
          "data.sft.sources=[{name: skills}]", "tokenizer.vocab_size=400"]
"""The ci preset cut to a few seconds of data and training, without MLflow."""


def test_a_nan_in_a_flow_stage_ends_dgpt_run_with_one_line_naming_the_stage_and_marks_only_it_failed(tmp_path):
    shrunk = [item for item in SHRUNK if item != "tracking.enabled=false"]
    overrides = [arg for item in [*shrunk, "pretrain.learning_rate=1e30"] for arg in ("--set", item)]
    done = dgpt("run", "--preset", "ci", "--output-dir", str(tmp_path), "--run-name", "nan", *overrides, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-5000:]
    # Prefect's own shutdown notice may follow, at exit
    lines = [line for line in done.stderr.splitlines() if "Stopping temporary server" not in line]
    errors = [line for line in lines if line.startswith("dgpt run: ")]
    assert errors == [lines[-1]], lines[-5:]
    assert errors[0].startswith("dgpt run: stage pretrain failed: ") and "non-finite training loss" in errors[0]
    assert str(tmp_path / "nan" / "summary.json") in errors[0]
    assert "===== pretrain =====" in done.stderr, "the flow's progress logs stay on the console"
    # MLflow: the stage that failed is FAILED, the one that completed stays FINISHED
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_stage"] == "pretrain"
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([summary["mlflow"]["experiment_id"]])}
    assert statuses == {"nan": "FAILED", "data": "FINISHED", "pretrain": "FAILED"}
