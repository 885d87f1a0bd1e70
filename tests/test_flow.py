"""The pretrain-sft flow end to end on the ci preset, a cached re-run, MLflow contents, and a
two-process ZeRO-2 training stage."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

EXPECTED_STAGES = ["data", "pretrain", "sft", "untrained-model", "eval-untrained", "eval-pretrain", "eval-sft", "publish"]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def two_runs(prefect_server, tmp_path_factory):
    from flows.pretrain_sft import pretrain_sft

    root = tmp_path_factory.mktemp("runs")
    first = pretrain_sft(preset="ci", output_dir=str(root), run_name="first")
    second = pretrain_sft(preset="ci", output_dir=str(root), run_name="second")
    return root, first, second


def test_first_run_completes_every_stage_and_writes_the_summary(two_runs):
    root, first, _ = two_runs
    summary = json.loads((root / "first" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["preset"] == "ci"
    assert list(summary["cache_hit"]) == EXPECTED_STAGES
    assert not any(summary["cache_hit"].values())
    assert set(summary["wall_time_s"]) == {*EXPECTED_STAGES, "total"}
    for name in ("pretrain", "sft"):
        model_dir = Path(summary["models"][name])
        assert model_dir.is_absolute() and (model_dir / "model.safetensors").exists()
        assert (model_dir / "run_config.yaml").exists()
    for name in ("untrained", "pretrain", "sft"):
        paths = summary["evals"][name]
        assert Path(paths["metrics_path"]).exists() and Path(paths["report_path"]).exists()
    card = Path(summary["report_card"]).read_text()
    assert "## Evaluation" in card and "git commit" in card and "| sft |" in card
    assert summary["publish"]["verified"] and not summary["publish"]["uploaded"]
    assert (Path(summary["publish"]["folder"]) / "README.md").exists()
    assert (root / "latest").resolve() == (root / "second").resolve()


def test_second_run_hits_the_cache_for_every_stage(two_runs):
    root, first, second = two_runs
    assert second["status"] == "completed"
    assert second["cache_hit"] == {stage: True for stage in EXPECTED_STAGES}
    assert second["models"] == first["models"] and second["evals"] == first["evals"]
    assert second["wall_time_s"]["total"] < first["wall_time_s"]["total"] / 3


def test_mlflow_has_parent_and_child_runs_metrics_artifacts_and_the_registered_model(two_runs):
    root, first, second = two_runs
    ml = first["mlflow"]
    client = MlflowClient(ml["tracking_uri"])
    parent = client.get_run(ml["parent_run_id"])
    assert parent.data.tags["preset"] == "ci" and parent.data.tags["prefect.flow_run_id"] == first["flow_run_id"]
    assert {"git.commit", "git.dirty"} <= set(parent.data.tags)
    assert parent.data.params["sft.learning_rate"] == "0.001" and "model.hidden_size" in parent.data.params
    children = client.search_runs([ml["experiment_id"]], f"tags.mlflow.parentRunId = '{ml['parent_run_id']}'")
    assert {run.info.run_name for run in children} >= {"data", "pretrain", "sft", "eval-sft", "publish"}
    by_name = {run.info.run_name: run for run in children}
    loss_curve = client.get_metric_history(by_name["pretrain"].info.run_id, "loss")
    assert len(loss_curve) >= 2, "training curves are logged per step"
    assert {"masked_loss", "edit_loss", "tokens_per_second"} <= set(by_name["pretrain"].data.metrics)
    assert any(k.startswith("eval/sft/") for k in parent.data.metrics)
    parent_artifacts = {a.path for a in client.list_artifacts(ml["parent_run_id"])}
    assert {"run_config.yaml", "report_card.md", "summary.json"} <= parent_artifacts
    eval_artifacts = {a.path for a in client.list_artifacts(by_name["eval-sft"].info.run_id, "eval")}
    assert "eval/metrics.json" in eval_artifacts and "eval/report.md" in eval_artifacts
    registered = second["registered_model"]
    assert int(registered["version"]) == int(first["registered_model"]["version"]) + 1
    version = client.get_model_version_by_alias(registered["name"], registered["alias"])
    assert version.run_id == second["mlflow"]["stage_run_ids"]["sft"], "the alias follows the newest run"
    assert client.get_model_version(registered["name"], first["registered_model"]["version"]).run_id == by_name["sft"].info.run_id
