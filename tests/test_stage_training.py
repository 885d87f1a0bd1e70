"""One training stage end to end (train_stage / run_training_stage on a tiny ci-like config):
forced reruns start clean, interrupted ones resume, and the validation ELBO is logged as a curve
into the stage's own MLflow run."""

import json
import subprocess
from pathlib import Path

import datasets
import pytest
from transformers import ModernBertForMaskedLM, TrainerCallback

from dgpt_core.config import RunConfig, load_run_config
from dgpt_core.diffusion.elbo import Row, dataset_rows, elbo_per_token
from dgpt_core.generation.schedules import get_schedule
from dgpt_core.models.tokenizer import load_tokenizer, special_token_ids
from dgpt_core.training.stage import single_process_env, train_stage
from dgpt_core.training.trainer import COMPLETE_MARKER
from tasks.launch import run_training_stage

from .conftest import structured_corpus

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_seq_len=64", "pretrain.max_steps=8", "pretrain.per_device_batch_size=4",
        "pretrain.logging_steps=1", "pretrain.save_steps=2", "pretrain.save_total_limit=2",
        "pretrain.deepspeed=null", "pretrain.val_max_sequences=6", "pretrain.val_t_points=4"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state(monkeypatch):
    """No DeepSpeed process state carried in from an earlier in-process DeepSpeed run (accelerate
    leaves ACCELERATE_USE_DEEPSPEED=true behind, which turns later Trainers into DeepSpeed ones),
    and none carried out to later tests."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def stage_inputs(tiny_tokenizer, tmp_path_factory) -> tuple[str, str]:
    """(dataset folder with train / validation splits, tokenizer folder)."""
    root = tmp_path_factory.mktemp("stage_inputs")
    tiny_tokenizer.save_pretrained(root / "tokenizer")
    texts = structured_corpus(80)
    split = {name: datasets.Dataset.from_dict({"input_ids": [tiny_tokenizer.encode(t) for t in part]})
             for name, part in (("train", texts[:64]), ("validation", texts[64:]))}
    datasets.DatasetDict(split).save_to_disk(str(root / "data"))
    return str(root / "data"), str(root / "tokenizer")


def run_config(tmp_path: Path, *overrides: str) -> RunConfig:
    return load_run_config("ci", [*TINY, *overrides])


def checkpoint_losses(out_dir: Path, step: int = 8) -> dict[int, float]:
    state = json.loads((out_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def test_a_forced_rerun_retrains_and_an_interrupted_one_resumes(stage_inputs, tmp_path):
    data, tokenizer = stage_inputs
    config, out = run_config(tmp_path), tmp_path / "pretrain"

    def train(resume: bool) -> dict:
        return run_training_stage(config, "pretrain", data, tokenizer, str(out), None, {}, resume=resume)

    first = train(resume=False)
    losses = checkpoint_losses(out)
    assert first["metrics"]["steps"] == 8 and sorted(losses) == list(range(1, 9))
    assert first["metrics"]["train_loss"] == pytest.approx(sum(losses.values()) / 8, rel=1e-6)

    # forced rerun over the finished checkpoint: all 8 steps again, old checkpoints gone
    (out / "checkpoints" / "checkpoint-99").mkdir()
    forced = train(resume=False)
    assert forced["metrics"]["steps"] == 8
    assert forced["metrics"]["train_loss"] == pytest.approx(first["metrics"]["train_loss"], rel=1e-6)
    assert not (out / "checkpoints" / "checkpoint-99").exists()

    # an unforced rerun does not resume from a checkpoint at max_steps either
    unforced = train(resume=True)
    assert unforced["metrics"]["steps"] == 8
    assert unforced["metrics"]["train_loss"] == pytest.approx(first["metrics"]["train_loss"], rel=1e-6)

    # an interrupted stage resumes from its last complete checkpoint; train_loss covers steps 7-8
    (out / "checkpoints" / "checkpoint-8" / COMPLETE_MARKER).unlink()
    resumed = train(resume=True)
    assert resumed["metrics"]["steps"] == 8
    assert resumed["metrics"]["train_loss"] == pytest.approx((losses[7] + losses[8]) / 2, rel=1e-6)
    assert checkpoint_losses(out) == pytest.approx(losses)


@pytest.mark.parametrize("resume", [True, False])
def test_the_launcher_path_passes_resume_only_when_asked(stage_inputs, tmp_path, monkeypatch, resume):
    data, tokenizer = stage_inputs
    config, out = run_config(tmp_path, "pretrain.num_processes=2"), tmp_path / "pretrain"
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stage_result.json").write_text(json.dumps({"model_dir": str(out / "model"), "metrics": {}}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr("tasks.launch.subprocess.run", fake_run)
    run_training_stage(config, "pretrain", data, tokenizer, str(out), None, {}, resume=resume)
    assert ("--resume" in commands[0]) == resume


class LogRecorder(TrainerCallback):
    """Every log entry with the step it was logged at and whether the model was in train mode."""

    def __init__(self):
        self.entries: list[tuple[int, dict, bool]] = []

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        self.entries.append((state.global_step, dict(logs), model.training))


def test_val_elbo_is_logged_every_eval_steps_and_at_the_end(stage_inputs, tmp_path):
    data, tokenizer_dir = stage_inputs
    run = load_run_config("ci", [*TINY, "pretrain.eval_steps=3", "pretrain.save_steps=null"])
    recorder = LogRecorder()
    result = train_stage(run, "pretrain", data, tokenizer_dir, tmp_path, callbacks=[recorder], show_progress=False)

    val = [(step, logs["val_elbo"], training) for step, logs, training in recorder.entries if "val_elbo" in logs]
    assert [step for step, _, _ in val] == [3, 6, 8]
    assert [step for step, logs, _ in recorder.entries if "loss" in logs] == list(range(1, 9)), "no loss log dropped"
    assert all(training for _, _, training in val), "train mode is restored after the validation pass"
    assert result.metrics["val_elbo"] == val[-1][1] and "eval_loss" not in result.metrics

    # the final value is the repeatable bound of the saved model on the first val_max_sequences rows
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = special_token_ids(tokenizer)
    rows = dataset_rows(datasets.load_from_disk(data)["validation"], 6)
    expected = elbo_per_token(ModernBertForMaskedLM.from_pretrained(result.model_dir), rows, mask_id=ids["mask"],
                              pad_id=ids["pad"], schedule=get_schedule(run.pretrain.diffusion.schedule), t_points=4,
                              batch_size=4)
    assert result.metrics["val_elbo"] == pytest.approx(expected, rel=1e-4)


def test_dataset_rows_target_the_eligible_positions():
    sft = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [9, 10]], "eligible_mask": [[0, 0, 1, 1], [1, 0]]})
    assert dataset_rows(sft, 1) == [Row([5, 6, 7, 8], [2, 3])]
    text = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]]})
    assert dataset_rows(text, 5) == [Row([5, 6, 7], [0, 1, 2]), Row([8, 9], [0, 1])]


def test_zero2_stage_logs_val_elbo_into_its_own_mlflow_run_only(stage_inputs, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    for key, value in single_process_env().items():
        monkeypatch.setenv(key, value)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("stage-test", artifact_location=(tmp_path / "artifacts").as_uri())
    stage_run = client.create_run(experiment, run_name="pretrain").info.run_id
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        data, tokenizer = stage_inputs
        config = run_config(tmp_path, "pretrain.deepspeed=zero2", "pretrain.use_cpu=true", "pretrain.eval_steps=4",
                            "pretrain.save_steps=null")
        result = run_training_stage(config, "pretrain", data, tokenizer, str(tmp_path / "pretrain"), None,
                                    {"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": stage_run,
                                     "MLFLOW_EXPERIMENT_ID": experiment}, resume=True)
    finally:
        mlflow.set_tracking_uri(previous_uri)

    assert result["metrics"]["world_size"] == 1 and "val_elbo" in result["metrics"]
    runs = client.search_runs([experiment], run_view_type=mlflow.entities.ViewType.ALL)
    assert [r.info.run_id for r in runs] == [stage_run], "no stray runs next to the stage's own"
    history = client.get_metric_history(stage_run, "val_elbo")
    assert [m.step for m in history] == [4, 8]
    assert history[-1].value == pytest.approx(result["metrics"]["val_elbo"])
