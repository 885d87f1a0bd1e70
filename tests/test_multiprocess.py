"""Several training processes on one machine (CPU, gloo): two processes under torchrun and under
the deepspeed launcher, ZeRO-2 and ZeRO-3, train exactly like one process accumulating two
micro-batches of the same size.

Why they are equal by construction: the sampler deals the global batch order out to the ranks in
turn (rank r takes batch r of every step, the one process takes the same two as its two
micro-batches); the collator's random stream comes from each batch's content and its curriculum
clock counts micro-batches per optimizer step; the loss is normalised by the count over all
processes and the whole accumulation window. So the per-step losses, the logged curriculum
state and the saved weights agree.

The runs are shared: one one-process reference per case, each launched run once; the stages run
in a working directory that holds folders named `zero2` and `zero3`, which must not be taken for
the DeepSpeed configs of those names. ZeRO-2 runs the pretraining stage (token normalisation, the
edit stage switching on halfway), ZeRO-3 the SFT stage (sequence normalisation, edits from the
start, insertions).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from dgpt_core.cli_errors import NotFoundError
from dgpt_core.config import FOLDER_CONFIG_NAME, load_run_config
from dgpt_core.data.stages import prepare_all
from dgpt_core.training.stage import single_process_env
from dgpt_core.training.trainer import COMPLETE_MARKER, DEEPSPEED_CONFIG_DIR, resolve_deepspeed
from tasks.launch import run_training_stage


class Case(NamedTuple):
    zero: str
    stage: str


CASES = [Case("zero2", "pretrain"), Case("zero3", "sft")]
LAUNCHERS = ["torchrun", "deepspeed"]
DEFAULT_RUNS = [(Case("zero2", "pretrain"), "deepspeed"), (Case("zero3", "sft"), "torchrun")]
"""The launched runs of the default test run (MLflow reporting and resume use them); the other two
pairings of ZeRO stage and launcher are `slow`."""
RUN_PARAMS = [pytest.param(case, launcher, id=f"{case.zero}-{launcher}",
                           marks=() if (case, launcher) in DEFAULT_RUNS else pytest.mark.slow)
              for case in CASES for launcher in LAUNCHERS]
LOGGED = ("loss", "masked_loss", "edit_loss", "mean_t", "edit_prob", "edit_stage", "grad_norm", "learning_rate")
"""Per-step log entries that must agree (not tokens_per_second, a timing)."""


def overrides(case: Case, launcher: str | None) -> list[str]:
    """4 steps of 8 sequences: 2 processes x 4 (launcher given), or 1 process x 4 x 2 micro-batches."""
    s = case.stage
    common = [f"{s}.deepspeed={case.zero}", f"{s}.max_steps=4", f"{s}.logging_steps=1", f"{s}.save_steps=2",
              f"{s}.per_device_batch_size=4", f"{s}.val_max_sequences=4", f"{s}.val_t_points=2"]
    if launcher is None:
        return [*common, f"{s}.gradient_accumulation_steps=2"]
    return [*common, f"{s}.num_processes=2", f"{s}.launcher={launcher}"]


def step_logs(out: Path, step: int = 4) -> dict[int, dict]:
    """The per-step log entries (loss and its parts) in checkpoint-`step`'s trainer state."""
    state = json.loads((out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def ci_data(tmp_path_factory) -> dict[str, Path]:
    run = load_run_config("ci")
    return prepare_all(run.data, run.tokenizer, run.model.max_seq_len, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> dict[str, str]:
    """A stage's MLflow run in a fresh database, as the flow hands it to a stage: the environment."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("multiprocess", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment, run_name="pretrain").info.run_id
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run_id, "MLFLOW_EXPERIMENT_ID": experiment}


class StageRuns:
    """The stage runs the tests share, each trained on first use: one process with two
    micro-batches (launcher None, in this process) or two processes through `launcher`, in a
    working directory holding folders named like the DeepSpeed configs. The deepspeed-launcher
    ZeRO-2 run reports to the MLflow run of `tracking`."""

    def __init__(self, data: dict[str, Path], tracking: dict[str, str], root: Path):
        self.data, self.tracking, self.root = data, tracking, root
        self.workdir = root / "cwd"
        for case in CASES:
            (self.workdir / case.zero).mkdir(parents=True)
        self.done: dict[tuple[Case, str | None], Path] = {}

    def __call__(self, case: Case, launcher: str | None) -> Path:
        """The output folder of the run, trained from scratch the first time it is asked for."""
        if (case, launcher) not in self.done:
            out = self.root / f"{case.zero}-{launcher or 'one'}"
            self.launch(case, launcher, out, resume=False)
            self.done[case, launcher] = out
        return self.done[case, launcher]

    def launch(self, case: Case, launcher: str | None, out: Path, *, resume: bool) -> dict:
        """Train through run_training_stage into `out`; its result (model_dir and metrics)."""
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        config = load_run_config("ci", overrides(case, launcher))
        tracking_env = self.tracking if (case.zero, launcher, resume) == ("zero2", "deepspeed", False) else {}
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(self.workdir)
            mp.setenv("OMP_NUM_THREADS", "1")
            mp.setenv("DS_ACCELERATOR", "cpu")
            mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # the deepspeed CLI
            if launcher is None:  # in this process: DeepSpeed as one process of one, no state left behind
                mp.setenv("ACCELERATE_USE_DEEPSPEED", "false")
                for key, value in single_process_env().items():
                    mp.setenv(key, value)
                AcceleratorState._reset_state(reset_partial_state=True)
            try:
                result = run_training_stage(config, case.stage, str(self.data[case.stage]),
                                            str(self.data["tokenizer"]), str(out), None, tracking_env, resume=resume)
            finally:
                if launcher is None:
                    AcceleratorState._reset_state(reset_partial_state=True)
                    unset_hf_deepspeed_config()
        assert result["metrics"]["world_size"] == (1 if launcher is None else 2)
        assert result["metrics"]["steps"] == 4
        if launcher is not None:
            assert load_run_config(out / FOLDER_CONFIG_NAME) == config, "the launched ranks read this config"
        return result


@pytest.fixture(scope="module")
def train(ci_data, tracking, tmp_path_factory) -> StageRuns:
    return StageRuns(ci_data, tracking, tmp_path_factory.mktemp("runs"))


def test_a_deepspeed_config_name_is_never_looked_up_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero2").mkdir()
    (tmp_path / "zero3.json").mkdir()
    own = tmp_path / "own.json"
    own.write_text("{}")

    assert resolve_deepspeed("zero2") == str(DEEPSPEED_CONFIG_DIR / "zero2.json")
    assert resolve_deepspeed("own.json") == "own.json" and resolve_deepspeed(str(own)) == str(own)
    assert resolve_deepspeed({"zero_optimization": {"stage": 2}}) == {"zero_optimization": {"stage": 2}}
    assert resolve_deepspeed(None) is None
    with pytest.raises(NotFoundError, match=r"unknown DeepSpeed config 'zero9': use one of \['zero1'"):
        resolve_deepspeed("zero9")
    for path in ("zero3.json", "./zero2", "missing.json", "configs/zero2"):  # paths: a folder is not a config
        with pytest.raises(NotFoundError, match=f"DeepSpeed config file {path} does not exist"):
            resolve_deepspeed(path)


@pytest.mark.parametrize(("case", "launcher"), RUN_PARAMS)
def test_two_processes_train_like_one_accumulating_two_micro_batches(train, case, launcher):
    reference, launched = train(case, None), train(case, launcher)

    expected, got = step_logs(reference), step_logs(launched)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        for key in LOGGED:
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-7), (step, key)
    assert {step: logs["edit_stage"] for step, logs in got.items()} == (
        {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0} if case.stage == "pretrain" else dict.fromkeys(range(1, 5), 1.0))
    metrics = [json.loads((out / "model" / "train_metrics.json").read_text()) for out in (reference, launched)]
    assert metrics[1]["tokens_seen"] == metrics[0]["tokens_seen"], "every rank's tokens are counted once"

    ref_weights, weights = saved_weights(reference), saved_weights(launched)
    assert weights.keys() == ref_weights.keys()
    for key, value in weights.items():
        assert value.numel() > 0, f"{key}: not gathered from the ZeRO-3 shards"
        torch.testing.assert_close(value, ref_weights[key], rtol=1e-5, atol=1e-6, msg=key)


LOAD_CHECK = """
import sys
from safetensors.torch import load_file
from transformers import ModernBertForMaskedLM

for folder in sys.argv[1:]:
    model, info = ModernBertForMaskedLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), (folder, info)
    state = model.state_dict()
    for key, value in load_file(f"{folder}/model.safetensors").items():
        assert state[key].equal(value), (folder, key)
assert "deepspeed" not in sys.modules
"""


def test_the_launched_runs_models_load_in_a_fresh_process_without_deepspeed(train):
    folders = [str(train(case, launcher) / "model") for case, launcher in DEFAULT_RUNS]
    subprocess.run([sys.executable, "-c", LOAD_CHECK, *folders], check=True, timeout=300)


def test_a_two_process_run_resumes_exactly(train, tmp_path):
    """The ZeRO-3 torchrun run, interrupted after checkpoint-2 (checkpoint-4 unmarked), resumes to
    the same steps 3-4: data order, collator streams, curriculum clock and RNG state per rank."""
    case = Case("zero3", "sft")
    uninterrupted = train(case, "torchrun")
    out = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / "checkpoint-4" / COMPLETE_MARKER).unlink()
    result = train.launch(case, "torchrun", out, resume=True)

    before, after = step_logs(uninterrupted), step_logs(out)
    assert sorted(after) == [1, 2, 3, 4]
    for step in (3, 4):
        assert {key: after[step][key] for key in LOGGED} == {key: before[step][key] for key in LOGGED}, step
    assert result["metrics"]["train_loss"] == pytest.approx((before[3]["loss"] + before[4]["loss"]) / 2, rel=1e-6)
    expected_weights = saved_weights(uninterrupted)
    for key, value in saved_weights(out).items():
        assert value.equal(expected_weights[key]), key


def test_two_processes_log_into_the_stages_mlflow_run_once(train, tracking):
    """Only rank 0 reports: the database holds the stage's run alone, each step's metrics once."""
    import mlflow
    from mlflow.tracking import MlflowClient

    logs = step_logs(train(Case("zero2", "pretrain"), "deepspeed"))
    client = MlflowClient(tracking["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([tracking["MLFLOW_EXPERIMENT_ID"]], run_view_type=mlflow.entities.ViewType.ALL)
    assert [run.info.run_id for run in runs] == [tracking["MLFLOW_RUN_ID"]], "no stray runs from other ranks"
    for key in ("loss", "mean_t", "edit_stage"):
        history = client.get_metric_history(tracking["MLFLOW_RUN_ID"], key)
        assert [(m.step, m.value) for m in history] == [
            (step, pytest.approx(logs[step][key], rel=1e-6)) for step in sorted(logs)], key
    assert [m.step for m in client.get_metric_history(tracking["MLFLOW_RUN_ID"], "val_elbo")] == [4]
