"""Training stages through the launchers: two CPU processes under DeepSpeed ZeRO-2 (torchrun)."""

import pytest

from dgpt_core.data.stages import prepare_all
from dgpt_core.run_config import load_run_config
from tasks.launch import launcher_command, run_training_stage


@pytest.fixture(scope="module")
def ci_data(tmp_path_factory):
    run = load_run_config("ci")
    return prepare_all(run.data, run.tokenizer, run.model.max_seq_len, tmp_path_factory.mktemp("data"))


def test_two_process_zero2_cpu_training(ci_data, tmp_path, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = load_run_config("ci", ["pretrain.max_steps=4", "pretrain.num_processes=2", "pretrain.logging_steps=2",
                                 "pretrain.deepspeed=zero2", "pretrain.per_device_batch_size=4"])
    result = run_training_stage(run, "pretrain", str(ci_data["pretrain"]), str(ci_data["tokenizer"]),
                                str(tmp_path / "pretrain"), None, {})
    assert result["metrics"]["world_size"] == 2
    assert result["metrics"]["steps"] == 4
    assert (tmp_path / "pretrain" / "model" / "model.safetensors").exists()
    assert load_run_config(tmp_path / "pretrain" / "run_config.yaml") == run, "the launched ranks read this config"


def test_launcher_commands():
    run = load_run_config("ci", ["sft.num_processes=8", "sft.num_nodes=2", "sft.rdzv_endpoint=node0:29500"])
    cmd = launcher_command(run.sft, ["--stage", "sft"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--rdzv_endpoint") + 1] == "node0:29500"
    assert cmd[-4:] == ["-m", "dgpt_core.train", "--stage", "sft"]
    ds = load_run_config("ci", ["sft.num_processes=4", "sft.launcher=deepspeed"])
    assert launcher_command(ds.sft, [])[:3] == ["deepspeed", "--num_gpus", "4"]
    with pytest.raises(ValueError, match="hostfile"):
        launcher_command(load_run_config("ci", ["sft.launcher=deepspeed", "sft.num_nodes=2"]).sft, [])
