"""Sweeps: the search space, the report's arithmetic, Optuna pruning on the validation curve, and
real `dgpt sweep`s on the `ci` preset sharing the stage cache, nested in MLflow, with a failing trial."""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from dgpt_core.cli_errors import ConfigError
from dgpt_core.config.sweep import SweepConfig, check_keys, grid_settings, metric_direction, parse_dimension
from dgpt_core.training.pruning import OptunaPruningCallback, TrialPrunedError, sweep_pruner
from flows.sweep_report import TrialRecord, best_trial, cache_accounting

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ["--set", "pretrain.max_steps=4", "--set", "sft.max_steps=4", "--set", "pretrain.deepspeed=null",
         "--set", "sft.deepspeed=null", "--set", "eval_models=[sft]", "--set", "eval.tasks=[ppl]",
         "--set", "tracking.system_metrics=false"]
"""The `ci` preset cut to seconds per trial: the sweep's machinery is under test, not the model."""


def test_dimensions_parse_lists_ranges_and_yaml_values():
    assert parse_dimension("sft.learning_rate=1e-3,3e-4").values == [1e-3, 3e-4]  # YAML 1.1 reads 1e-3 as text
    assert parse_dimension("eval_models=[sft],[sft,pretrain]").values == [["sft"], ["sft", "pretrain"]]
    log_range = parse_dimension("sft.learning_rate=1e-4:1e-2:log")
    assert (log_range.low, log_range.high, log_range.log, log_range.integer) == (1e-4, 1e-2, True, False)
    assert parse_dimension("sft.max_steps=10:40").integer
    for bad in ("sft.learning_rate", "sft.learning_rate=1e-2:1e-4", "x=0:1:log", "x=1,1"):
        with pytest.raises(ConfigError, match="sweep dimension"):
            parse_dimension(bad)
    with pytest.raises(ConfigError, match="a grid takes value lists"):
        grid_settings([log_range])


def test_a_grid_is_the_product_of_its_dimensions_in_order():
    space = [parse_dimension("a.x=1,2"), parse_dimension("b.y=u,v,w")]
    assert grid_settings(space) == [{"a.x": 1, "b.y": "u"}, {"a.x": 1, "b.y": "v"}, {"a.x": 1, "b.y": "w"},
                                    {"a.x": 2, "b.y": "u"}, {"a.x": 2, "b.y": "v"}, {"a.x": 2, "b.y": "w"}]


def test_keys_are_checked_against_the_config_and_the_direction_follows_the_metric():
    from dgpt_core.config import load_run_config

    ci = load_run_config("ci", [])
    check_keys(ci, [parse_dimension("sft.diffusion.edit_prob=0,2")], "sft.seed")  # a bad value is a trial's problem
    with pytest.raises(ConfigError, match="'sft.learnin_rate' is not a config field"):
        check_keys(ci, [parse_dimension("sft.learnin_rate=1,2")], "sft.seed")
    with pytest.raises(ConfigError, match="given twice"):
        check_keys(ci, [parse_dimension("sft.seed=1,2")], "sft.seed")
    assert metric_direction("train/sft/val_elbo") == "minimize"
    assert metric_direction("eval/sft/ppl_bound/value") == "minimize"
    assert metric_direction("eval/sft/benchmarks/dgpt_world/confidence/heldout") == "maximize"
    cfg = SweepConfig(name="s", space=[parse_dimension("a=1,2")], seeds=[3], overrides=["sft.max_steps=4"])
    assert cfg.trial_overrides({"sft.learning_rate": 1e-3, "eval_models": ["sft"]}, 3) == [
        "sft.max_steps=4", "sft.learning_rate=0.001", "eval_models=[sft]", "sft.seed=3"]


def _record(number, seed, value, hits, walls, total):
    return TrialRecord(number=number, seed=seed, setting={"a": number}, run_name=f"t{number}-s{seed}",
                       status="completed" if value is not None else "failed", value=value, wall_s=total,
                       cache_hit=hits, stage_wall_s=walls)


def test_the_best_setting_is_the_best_mean_and_the_cache_estimate_replaces_hits_by_executions():
    cfg = SweepConfig(name="s", space=[parse_dimension("a=0,1")], seeds=[0, 1], metric="train/sft/val_elbo")
    records = [
        _record(0, 0, 2.0, {"data": False, "sft": False}, {"data": 10.0, "sft": 5.0}, 16.0),
        _record(0, 1, 4.0, {"data": True, "sft": False}, {"data": 0.1, "sft": 7.0}, 8.0),
        _record(1, 0, 2.5, {"data": True, "sft": False}, {"data": 0.1, "sft": 6.0}, 7.0),
        _record(1, 1, 2.9, {"data": True, "sft": False}, {"data": 0.1, "sft": 6.0}, 7.0),
    ]
    best = best_trial(cfg, records)
    assert (best["setting"], best["mean"], best["run_name"]) == (1, pytest.approx(2.7), "t1-s0")
    cache = cache_accounting(records, sweep_wall_s=40.0)
    assert cache["stages"]["data"] == {"executed": 1, "cache_hits": 3, "seconds_per_execution": 10.0}
    assert cache["executions_saved"] == 3
    assert cache["no_cache_estimate_s"] == pytest.approx(16 + (8 - 0.1 + 10) + 2 * (7 - 0.1 + 10))


def test_the_pruning_callback_stops_a_trial_whose_curve_is_worse_than_the_median(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, pruner=sweep_pruner())
    for value in (1.0, 1.2):
        trial = study.ask()
        trial.report(value, 10)
        study.tell(trial, value)

    class State:
        is_world_process_zero, global_step = True, 10

    good, bad = study.ask(), study.ask()
    OptunaPruningCallback(storage, "s", good.number).on_log(None, State(), None, logs={"val_elbo": 0.9})
    with pytest.raises(TrialPrunedError, match="pruned at step 10"):
        OptunaPruningCallback(storage, "s", bad.number).on_log(None, State(), None, logs={"val_elbo": 3.0})
    assert study.get_trials()[bad.number].user_attrs["pruned_at_step"] == 10
    # a maximised objective gets val_elbo negated: a low loss is then a high value, never pruned
    OptunaPruningCallback(storage, "s", study.ask().number, sign=-1).on_log(None, State(), None, logs={"val_elbo": 0.1})


def _sweep(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", "sweep", "--preset", "ci", "--output-dir", str(out),
                           *CHEAP, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_an_unknown_sweep_key_is_one_line_and_exit_2(tmp_path):
    done = _sweep(tmp_path, "--grid", "sft.learnin_rate=1,2")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "dgpt sweep: sweep key 'sft.learnin_rate' is not a config field (preset ci)"


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """A 2 x 2 grid of SFT settings with 2 seeds, plus a third edit_prob that is not a valid value."""
    out = tmp_path_factory.mktemp("sweep")
    done = _sweep(out, "--name", "grid", "--grid", "sft.learning_rate=1e-3,3e-4",
                  "--grid", "sft.diffusion.edit_prob=0,0.05,2", "--seeds", "0,1")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "Traceback" not in done.stdout + done.stderr  # failed trials are report lines, not tracebacks
    return out, json.loads((out / "sweeps" / "grid" / "sweep.json").read_text())


def test_a_grid_with_seeds_completes_and_trains_data_and_pretraining_once(grid_sweep):
    out, summary = grid_sweep
    assert summary["counts"] == {"completed": 8, "failed": 4, "pruned": 0, "runs": 12}
    stages = summary["cache"]["stages"]
    assert stages["data"]["executed"] == 1 and stages["data"]["cache_hits"] == 7
    assert stages["pretrain"]["executed"] == 1 and stages["pretrain"]["cache_hits"] == 7
    assert stages["sft"]["executed"] == 8 and stages["sft"]["cache_hits"] == 0
    assert summary["cache"]["executions_saved"] == 14
    assert not (out / "latest").exists()  # trials never move `latest` off the newest pipeline run
    assert summary["cache"]["no_cache_estimate_s"] > summary["cache"]["trials_wall_s"]
    rows = {(r["values"]["sft.learning_rate"], r["values"]["sft.diffusion.edit_prob"]): r for r in summary["settings"]}
    assert sorted(rows) == sorted((lr, p) for lr in (1e-3, 3e-4) for p in (0, 0.05, 2))
    for (_, edit_prob), row in rows.items():
        if edit_prob == 2:
            assert row["seeds_ok"] == 0 and row["mean"] is None and row["status"] == "failed"
            continue
        assert row["seeds_ok"] == 2 and row["std"] is not None
        runs = [json.loads((out / t["run_name"] / "summary.json").read_text())["metrics"]["train/sft/val_elbo"]
                for t in summary["trials"] if t["number"] == row["setting"]]
        assert row["mean"] == pytest.approx(sum(runs) / 2)  # the mean of its two runs' own summaries


def test_a_trial_with_an_invalid_value_is_reported_while_the_others_finish(grid_sweep):
    out, summary = grid_sweep
    failed = [t for t in summary["trials"] if t["status"] == "failed"]
    assert len(failed) == 4 and all(t["setting"]["sft.diffusion.edit_prob"] == 2 for t in failed)
    assert all("sft.diffusion.edit_prob" in t["error"] and "must be <= 1.0 (got 2)" in t["error"] for t in failed)
    report = (out / "sweeps" / "grid" / "sweep.md").read_text().replace("`", "")
    assert all(f"{t['run_name']} (failed): invalid config" in report for t in failed)


def test_the_report_has_a_row_per_setting_and_run_and_a_plot_per_key(grid_sweep):
    out, summary = grid_sweep
    report = (out / "sweeps" / "grid" / "sweep.md").read_text()
    settings = report.split("## Settings")[1].split("## Runs")[0]
    runs = report.split("## Runs")[1].split("## Stage cache")[0]
    assert sum(line.startswith("| ") for line in settings.splitlines()) == 1 + 6
    assert sum(line.startswith("| grid-t") for line in runs.splitlines()) == 12
    plots = sorted(Path(p).name for p in summary["plots"])
    assert plots == ["metric_vs_sft_diffusion_edit_prob.png", "metric_vs_sft_learning_rate.png"]
    assert all((out / "sweeps" / "grid" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)


def test_mlflow_holds_one_sweep_run_with_the_trials_nested_and_a_champion(grid_sweep):
    out, summary = grid_sweep
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("diffusiongpt").experiment_id], max_results=1000)
    sweeps = [r for r in runs if r.data.tags.get("dgpt.kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    sweep_run = sweeps[0]
    assert sweep_run.info.run_id == summary["mlflow"]["sweep_run_id"]
    assert sweep_run.data.params["sweep.metric"] == "train/sft/val_elbo"
    assert sweep_run.data.metrics["train/sft/val_elbo"] == pytest.approx(summary["best"]["mean"])
    assert sweep_run.data.metrics["sweep/failed"] == 4
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep_run.info.run_id]
    ran = [t["run_name"] for t in summary["trials"] if t["status"] == "completed"]
    assert sorted(r.info.run_name for r in trials) == sorted(ran)  # an invalid config never starts a run
    assert {r.info.status for r in trials} == {"FINISHED"}
    for trial in trials:  # the compare view works on the trial runs' params and metrics directly
        assert float(trial.data.params["sft.learning_rate"]) in (1e-3, 3e-4)
        assert "train/sft/val_elbo" in trial.data.metrics
    assert {"sweep.md", "sweep.json"} <= {a.path for a in client.list_artifacts(sweep_run.info.run_id)}
    champion = client.get_model_version_by_alias("diffusiongpt", "champion")
    assert summary["champion"]["promoted"] and str(champion.version) == summary["champion"]["version"]
    assert champion.run_id == summary["best"]["model_run_id"]  # the best trial's SFT run, the only one registered
    assert len(client.search_model_versions("name='diffusiongpt'")) == 1


def test_a_sweep_that_does_not_beat_the_champion_keeps_it(grid_sweep, monkeypatch):
    from dgpt_core.config import load_run_config
    from flows.sweep import _promote_champion
    from flows.tracking import Tracker

    out, first = grid_sweep
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sweep's own database, whatever ran before
    base = load_run_config("ci", [])
    tracker = Tracker(base.tracking, out)
    cfg = SweepConfig(name="next", space=[parse_dimension("sft.seed=0,1")], seed_key="seed")
    worse = {"best": {**first["best"], "value": first["best"]["value"] + 0.5}}
    kept = _promote_champion(tracker, base, cfg, worse)
    assert not kept["promoted"] and "does not beat the champion" in kept["reason"]
    other_metric = cfg.model_copy(update={"metric": "eval/sft/benchmarks/dgpt_world/confidence/heldout"})
    kept = _promote_champion(tracker, base, other_metric, {"best": {**first["best"], "value": 1.0}})
    assert not kept["promoted"] and "has no eval/sft/benchmarks" in kept["reason"]
    champion = tracker.client.get_model_version_by_alias("diffusiongpt", "champion")
    assert str(champion.version) == first["champion"]["version"]


@pytest.mark.slow
def test_an_optuna_search_reports_every_setting_to_its_study_and_prunes_on_the_validation_curve(tmp_path):
    done = _sweep(tmp_path, "--name", "tpe", "--search", "optuna", "--trials", "5", "--seeds", "0",
                  "--grid", "sft.learning_rate=1e-5:1e-2:log", "--set", "sft.max_steps=8", "--set", "sft.eval_steps=2")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((tmp_path / "sweeps" / "tpe" / "sweep.json").read_text())
    assert summary["counts"]["runs"] == 5 and summary["counts"]["failed"] == 0
    study = optuna.load_study(study_name="tpe", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = {t.number: t.state.name for t in study.trials}
    for record in summary["trials"]:
        assert states[record["number"]] == {"completed": "COMPLETE", "pruned": "PRUNED"}[record["status"]]
        assert 1e-5 <= record["setting"]["sft.learning_rate"] <= 1e-2
        if record["status"] == "pruned":
            assert "TrialPrunedError: pruned at step" in record["error"]
            assert study.trials[record["number"]].user_attrs["pruned_at_step"] < 8
        else:
            assert study.trials[record["number"]].value == pytest.approx(record["value"])


@pytest.mark.slow
def test_parallel_trials_share_the_cache_and_train_in_processes_of_their_own(tmp_path):
    done = _sweep(tmp_path, "--name", "par", "--max-parallel", "2", "--grid", "sft.learning_rate=1e-3,3e-4")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((tmp_path / "sweeps" / "par" / "sweep.json").read_text())
    assert summary["counts"]["completed"] == 2
    assert {k: summary["cache"]["stages"][k]["executed"] for k in ("data", "pretrain", "sft")} == \
        {"data": 1, "pretrain": 1, "sft": 2}
    log = done.stdout + done.stderr
    assert "waiting for run 'par-t0" in log  # the second trial waited for the first's data stage
    assert log.count("launching sft: ") == 2 and "--nproc_per_node 1" in log
    assert log.count("Beginning subflow run") == 2  # both trials nested under the sweep's flow run
