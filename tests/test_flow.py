"""The pretrain-sft flow end to end on the ci preset, a cached re-run, MLflow contents, and a
two-process ZeRO-2 training stage."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dgpt_core.config import FOLDER_CONFIG_NAME, RunConfig
from dgpt_core.generation.options import method_options
from dgpt_core.models.info import read_model_info, read_sampler_defaults
from eval.strategy_comparison import repetition_safe_method

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
    for kind in ("untrained", "pretrain", "sft"):
        link = root / "first" / "models" / kind
        assert link.resolve() == Path(summary["models"][kind]).resolve()
        assert Path(summary["models"][kind]).parent.name.startswith(f"{kind}-"), "stage folders say what they hold"
        assert read_model_info(root / "latest" / "models" / kind).kind == kind
    assert summary["model_links"]["sft"] == str(root / "first" / "models" / "sft")


def test_sft_folder_decodes_with_the_best_setting_of_its_own_eval(two_runs):
    root, first, _ = two_runs
    folder = root / "latest" / "models" / "sft"
    info = read_model_info(folder)
    assert info.answer_canvas == 24 and info.answer_padding == "eos" and info.context_messages > 1
    defaults = read_sampler_defaults(folder)
    skills = json.loads(Path(first["evals"]["sft"]["metrics_path"]).read_text())["benchmarks"]["dgpt_skills"]
    best = max(row["exact_match"] for row in skills.values())
    assert defaults["max_new_tokens"] == 24 and defaults["temperature"] == 0.0
    assert defaults["strategy"] in skills and defaults["schedule"] == info.schedule
    chosen = skills[defaults["strategy"]]
    if int(chosen["steps"]) == defaults["steps"]:
        assert chosen["exact_match"] >= best - 0.01
    # the pretrain folder (open-ended text): the repetition-safe method of its own eval, if any, on the
    # study's canvas and steps; else only its schedule
    pretrain = json.loads(Path(first["evals"]["pretrain"]["metrics_path"]).read_text())
    safe = repetition_safe_method(pretrain["repetition_by_mode"])
    want = {"schedule": "linear", "t_eps": 0.001}
    if safe is not None:
        want.update(method_options(safe), steps=pretrain["meta"]["settings"]["steps"],
                    max_new_tokens=pretrain["meta"]["settings"]["plain_canvas"])
    got = read_sampler_defaults(root / "latest" / "models" / "pretrain")
    assert {k: got.get(k) for k in want} == want


def test_task_runs_are_named_for_their_work_and_logs_carry_library_lines_not_bytecode(two_runs):
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    _, first, _ = two_runs
    flow_run = UUID(first["flow_run_id"])
    APILogHandler().flush()  # send every queued log line before reading them back
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])))
        logs, page = [], True
        while page:  # the API answers at most its default limit of lines per call
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run])), offset=len(logs))
            logs += page
    assert sorted(run.name for run in task_runs) == sorted(
        ["data", "train-pretrain", "train-sft", "untrained-model", "eval-untrained", "eval-pretrain", "eval-sft",
         "publish"])
    messages = [log.message for log in logs]
    bytecode = [m for m in messages if any(op in m for op in ("LOAD_GLOBAL", "LOAD_FAST", "RETURN_VALUE", "RESUME"))]
    assert not bytecode, f"{len(bytecode)} of {len(messages)} lines are disassembly: {bytecode[:3]}"
    assert any(m.startswith("sft stage:") for m in messages), "data-stage logging reaches the run logs"
    assert any("===== eval-sft =====" in m for m in messages), "the flow's own prints are still logged"


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
    # the stage's peak memory and throughput, also on the card
    assert {"final/peak_rss_mb", "final/tokens_per_second", "final/trainable_parameters"} <= set(
        by_name["sft"].data.metrics)
    assert "peak RSS (MiB)" in Path(first["report_card"]).read_text()
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


# README command (as written) -> the shortened form run here; every command of the README's
# "Command line" block must be listed, so a new README command cannot go untested
README_COMMANDS = {
    "source .venv/bin/activate": None,  # the test already runs inside the environment
    "dgpt prepare --preset tiny": "dgpt prepare --preset ci",
    "dgpt run --preset tiny --set sft.max_steps=500": "dgpt run --preset ci --set sft.max_steps=4",
    "dgpt train --preset tiny": "dgpt train --preset ci --set pretrain.max_steps=2 --set sft.max_steps=2 --samples 1",
    "dgpt run --preset tiny --set rl.enabled=true": None,  # the flow with rl.enabled: the rl stage test below
    "dgpt eval runs/latest/models/sft --limit 50 --out runs/eval-sft":
        "dgpt eval runs/latest/models/sft --limit 2 --out runs/eval-sft --strategies confidence --steps-grid",
    "dgpt publish runs/latest/models/sft --repo-id you/name": "same",
    "dgpt bench --suite all --model runs/latest/models/sft --out runs/bench":
        "dgpt bench --suite sample --model runs/latest/models/sft --out runs/bench --preset ci --reps 1 --no-plots",
    "python -m bench.gpu runs/bench-gpu --smoke": None,  # tests/test_bench.py runs the smoke path
    'dgpt generate runs/latest/models/sft --prompt "Where was Sam Davis born?"': "same",
    'dgpt generate runs/latest/models/sft --prompt "Tell me about Sam Davis." --stream': "same",
    'dgpt generate runs/latest/models/pretrain --raw --prompt " Sam Davis was born on"': "same",
    'dgpt generate runs/latest/models/sft --prompt "Who was born on February 21, 1997 in Dallas?" --strategy confidence '
    "--steps 8 --no-prefix-cache": "same",
    "dgpt chat runs/latest/models/sft": "same",
}


def readme_block(heading: str, language: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("\n```", 1)[0]


def readme_commands() -> list[str]:
    """The Command line block's commands, continuation lines joined, comments dropped."""
    joined = readme_block("Command line", "bash").replace("\\\n", " ")
    return [shlex.join(shlex.split(line, comments=True)) for line in joined.splitlines() if line.strip()]


def test_every_readme_command_works_after_the_main_job(two_runs, tmp_path):
    root, _, _ = two_runs
    listed = {shlex.join(shlex.split(c)): short for c, short in README_COMMANDS.items()}
    assert readme_commands() == list(listed), "README commands and this test's table differ"
    assert shutil.which("dgpt"), "the dgpt command is on PATH in the project's environment"
    work = tmp_path / "work"
    work.mkdir()
    (work / "runs").symlink_to(root)
    # a fresh shell: not the process group this test process set up for its in-process training
    inherited = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in inherited and not k.startswith("ACCELERATE_")}
    for command, short in listed.items():
        if short is None:
            continue
        line = command if short == "same" else short
        stdin = "What is 12 plus 30?\n/reset\n/exit\n" if " chat " in line else None
        done = subprocess.run(shlex.split(line), cwd=work, env=env, input=stdin, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        if line.startswith("dgpt generate"):
            assert "[nfe=" in done.stderr, line
        if " chat " in line:
            assert "history cleared" in done.stdout
    assert (work / "runs" / "eval-sft" / "metrics.json").exists() and (work / "runs" / "bench" / "bench.json").exists()
    notebook = readme_block("From a notebook", "python")
    done = subprocess.run([sys.executable, "-c", notebook], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


WORLD = ["data.pretrain.sources=[{name: world, weight: 2}]", "data.sft.sources=[{name: world}]", "data.world.people=12",
         "data.sft.answer_canvas=64", "eval_models=[pretrain, sft, sft_control]",
         "eval.tasks=[ppl, dgpt_world, storage, repetition, editing]", "sft.pretrain_replay=0.25"]
"""The ci preset on the synthetic world, with pretraining text replayed in SFT and the control SFT
from the untrained model."""


def test_a_ci_sized_world_run_trains_the_control_and_leads_the_card_with_what_pretraining_contributed(two_runs):
    from flows.pretrain_sft import pretrain_sft

    root, first, _ = two_runs
    run = pretrain_sft(preset="ci", output_dir=str(root), run_name="world", overrides=WORLD)
    assert run["status"] == "completed"
    assert [s for s in run["cache_hit"] if s != "publish"] == [
        "data", "pretrain", "sft", "untrained-model", "sft_control", "eval-pretrain", "eval-sft", "eval-sft_control"]
    control, sft = Path(run["models"]["sft_control"]), Path(run["models"]["sft"])
    assert control.parent.name.startswith("sft_control-") and control != sft
    assert read_model_info(control).kind == "sft" and (control / "model.safetensors").exists()
    # the SFT model replays the biographies, the control must not read them
    replay = {name: RunConfig.from_yaml(folder / FOLDER_CONFIG_NAME).sft.pretrain_replay for name, folder in
              (("sft", sft), ("control", control))}
    assert replay == {"sft": 0.25, "control": 0.0}
    untrained = (Path(run["models"]["untrained"]) / "model.safetensors").read_bytes()
    assert (control / "model.safetensors").read_bytes() != untrained
    metrics = {name: json.loads(Path(paths["metrics_path"]).read_text()) for name, paths in run["evals"].items()}
    assert 0.0 <= metrics["pretrain"]["storage"]["cloze_accuracy"] <= 1.0
    for name in ("sft", "sft_control"):
        world = metrics[name]["benchmarks"]["dgpt_world"]
        assert set(world) == {"random", "confidence"} and all(0.0 <= row["heldout"] <= 1.0 for row in world.values())
    # the control is evaluated on what the card sets beside the SFT model, nothing more
    assert metrics["sft"]["repetition_by_mode"] and not metrics["sft_control"].get("repetition_by_mode")
    assert not metrics["sft_control"].get("storage") and not metrics["sft_control"].get("editing")
    # the pretrain folder decodes open-ended text by the repetition-safe method when there is one
    safe = repetition_safe_method(metrics["pretrain"]["repetition_by_mode"])
    defaults = read_sampler_defaults(run["models"]["pretrain"])
    assert defaults.get("strategy", "random") == ("random" if safe is None else method_options(safe)["strategy"])
    card = Path(run["report_card"]).read_text()
    assert card.index("## Headline: what pretraining contributed") < card.index("## Stages")
    assert "SFT from untrained (control)" in card and "text bound" in card and "answer bound" in card
    assert "held-out people: attribute exact match (random)" in card
    again = pretrain_sft(preset="ci", output_dir=str(root), run_name="world-again", overrides=WORLD)
    assert all(again["cache_hit"].values()) and again["models"] == run["models"]


RL = [*WORLD, "rl.enabled=true", "rl.max_steps=4", "rl.save_steps=2", "rl.per_device_batch_size=4", "rl.group_size=4",
      "rl.learning_rate=1e-4", "eval_models=[sft, rl]", "eval.tasks=[ppl]"]
"""A four-step RL stage on the train people's questions, from the cached SFT model of the world run
above. That model answers none of them right, so every group is flat and the weights stay the SFT
model's: this test is the stage's place in the flow (cache, resume, report); that GRPO learns is
tests/test_rl_grpo.py, and that an update moves the weights under every ZeRO config is
tests/test_deepspeed_configs.py."""


def rl_log(stage_dir: Path, step: int) -> list[dict]:
    state = json.loads((stage_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [{k: v for k, v in entry.items() if k not in ("epoch", "grad_norm")} for entry in state["log_history"]
            if "reward" in entry]


def test_the_rl_stage_trains_on_the_cached_sft_model_is_cached_and_resumes_after_a_kill(two_runs):
    from flows.pretrain_sft import pretrain_sft
    from tasks.stage_folders import STAGE_MARKER

    root, _, _ = two_runs
    run = pretrain_sft(preset="ci", output_dir=str(root), run_name="rl", overrides=RL)
    assert run["status"] == "completed"
    assert {s: run["cache_hit"][s] for s in ("data", "pretrain", "sft", "rl")} == {
        "data": True, "pretrain": True, "sft": True, "rl": False}
    sft, rl = Path(run["models"]["sft"]), Path(run["models"]["rl"])
    assert rl.parent.name.startswith("rl-")
    assert read_sampler_defaults(rl) == read_sampler_defaults(sft)
    assert run["train_metrics"]["rl"]["steps"] == 4 and "reward_last" in run["train_metrics"]["rl"]
    assert set(run["evals"]) == {"sft", "rl"}
    assert "SFT vs SFT + RL" in Path(run["report_card"]).read_text()
    logged = rl_log(rl.parent, 4)
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]

    again = pretrain_sft(preset="ci", output_dir=str(root), run_name="rl-again", overrides=RL)
    assert again["cache_hit"]["rl"] and again["models"]["rl"] == run["models"]["rl"]

    # what a kill -9 after step 3 leaves: no stage marker, and no complete checkpoint past step 2
    (rl.parent / STAGE_MARKER).unlink()
    shutil.rmtree(rl.parent / "checkpoints" / "checkpoint-4")
    shutil.rmtree(rl)
    resumed = pretrain_sft(preset="ci", output_dir=str(root), run_name="rl-resumed", overrides=RL)
    assert not resumed["cache_hit"]["rl"] and resumed["models"]["rl"] == run["models"]["rl"]
    assert resumed["train_metrics"]["rl"]["steps"] == 4
    assert rl_log(rl.parent, 4) == logged  # the resumed steps sample (answer lengths) and score as the first run did
    assert read_model_info(rl).kind == read_model_info(sft).kind


# runs last: it moves `latest` and the registry alias
def test_the_global_seed_reaches_every_training_stage(two_runs):
    from flows.pretrain_sft import pretrain_sft

    root, first, _ = two_runs
    reseeded = pretrain_sft(preset="ci", output_dir=str(root), run_name="seed1", overrides=["seed=1"], only=["sft"])
    assert reseeded["cache_hit"]["pretrain"] is False and reseeded["cache_hit"]["sft"] is False
    for stage in ("pretrain", "sft"):
        assert reseeded["models"][stage] != first["models"][stage]
        assert reseeded["train_metrics"][stage]["train_loss"] != first["train_metrics"][stage]["train_loss"]
    config = (root / "seed1" / "run_config.yaml").read_text()
    assert config.count("seed: 1") == 10 and "seed: 0" not in config
