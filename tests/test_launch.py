"""The launcher command lines (the launched runs themselves: tests/test_multiprocess.py)."""

import pytest

from dgpt_core.config import load_run_config
from tasks.launch import launcher_command


def test_launcher_commands():
    run = load_run_config("ci", ["sft.num_processes=8", "sft.num_nodes=2", "sft.rdzv_endpoint=node0:29500"])
    cmd = launcher_command(run.sft, ["--stage", "sft"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--rdzv_endpoint") + 1] == "node0:29500"
    assert cmd[-4:] == ["-m", "dgpt_core.training.stage", "--stage", "sft"]
    ds = load_run_config("ci", ["sft.num_processes=4", "sft.launcher=deepspeed"])
    assert launcher_command(ds.sft, [])[:3] == ["deepspeed", "--num_gpus", "4"]
    with pytest.raises(ValueError, match="hostfile"):
        launcher_command(load_run_config("ci", ["sft.launcher=deepspeed", "sft.num_nodes=2"]).sft, [])
