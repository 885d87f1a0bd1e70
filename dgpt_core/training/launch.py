"""Launching a training stage on several processes: the torchrun and deepspeed-launcher command
lines that run `python -m dgpt_core.training.stage` on every process, the environment the deepspeed
launcher exports to the other nodes, and what a failed launch reports.

torchrun starts the processes of one node; several nodes each run it (`dgpt train-node`) and meet
at a c10d rendezvous. The deepspeed launcher starts every node itself, over ssh (pdsh), from the
hosts of a hostfile. A worker that raises leaves its error in an error file under torchrun's log
dir (`@record` on `dgpt_core.training.stage.main`); `launch_error` turns the first one into one line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..cli_errors import ConfigError, DgptError, one_line
from ..config import LaunchedTrainingConfig
from .stage import free_port

TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
"""Environment of every torchrun: the processes of each attempt meet in a store of their own. In the
store torchrun shares by default, restarted processes find the failed attempt's addresses and
cannot connect (pytorch/pytorch#135712)."""
FORWARDED_ENV = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                 "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
"""Variables the deepspeed launcher exports to every node besides its own (PYTHON*, MLFLOW*, NCCL*
on CUDA): an ssh session starts with a bare environment."""


def torchrun_command(
    cfg: LaunchedTrainingConfig,
    module_args: list[str],
    *,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "dgpt",
    log_dir: str | Path | None = None,
    module: str = "dgpt_core.training.stage",
) -> list[str]:
    """This node's torchrun running `python -m <module>` (a stage's entry point) on cfg.num_processes processes,
    restarting them up to cfg.max_restarts times (run it with TORCHRUN_ENV). One node: a
    standalone rendezvous on a free loopback port; several: the c10d rendezvous at
    `rdzv_endpoint` (host:port every node reaches), where all nodes' torchruns with the same
    `rdzv_id` meet. Workers' error files go under `log_dir`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.num_processes),
           "--max_restarts", str(cfg.max_restarts)]
    if log_dir is not None:
        cmd += ["--log_dir", str(log_dir)]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise ConfigError("multi-node training with launcher=torchrun needs rdzv_endpoint host:port")
        cmd += ["--nnodes", str(nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv_endpoint,
                "--rdzv_id", rdzv_id]
    else:
        cmd.append("--standalone")
    return [*cmd, "-m", module, *module_args]


def deepspeed_command(cfg: LaunchedTrainingConfig, module_args: list[str],
                      module: str = "dgpt_core.training.stage") -> list[str]:
    """The deepspeed launcher running `python -m <module>` on cfg.num_processes processes
    of each of cfg.num_nodes hosts. Several nodes: the first num_nodes hosts of cfg.hostfile,
    each started over ssh (pdsh) in this working directory with this Python; rank 0's address
    and port are cfg.rdzv_endpoint, else the first host's `hostname -I` and port 29500."""
    cmd = ["deepspeed", "--num_gpus", str(cfg.num_processes)]
    if cfg.num_nodes > 1:
        if not cfg.hostfile:
            raise ConfigError("multi-node training with launcher=deepspeed needs a hostfile")
        cmd += ["--num_nodes", str(cfg.num_nodes), "--hostfile", cfg.hostfile]
        if cfg.rdzv_endpoint:
            host, _, port = cfg.rdzv_endpoint.rpartition(":")
            cmd += ["--master_addr", host, "--master_port", port]
    else:
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [*cmd, "--module", module, *module_args]


def launcher_command(cfg: LaunchedTrainingConfig, module_args: list[str], log_dir: str | Path | None = None,
                     module: str = "dgpt_core.training.stage") -> list[str]:
    """The command of cfg.launcher running the stage entry point `module` (torchrun: this node's part of it)."""
    if cfg.launcher == "deepspeed":
        return deepspeed_command(cfg, module_args, module)
    return torchrun_command(cfg, module_args, nnodes=cfg.num_nodes, rdzv_endpoint=cfg.rdzv_endpoint, log_dir=log_dir,
                            module=module)


def write_deepspeed_env(path: str | Path, env: Mapping[str, str]) -> Path:
    """The deepspeed launcher's env file (pass its path as DS_ENV_FILE): the FORWARDED_ENV
    variables set in `env`, then the lines of ~/.deepspeed_env and ./.deepspeed_env, which
    DS_ENV_FILE replaces."""
    lines = [f"{key}={env[key]}" for key in FORWARDED_ENV if key in env]
    for own in (Path.home() / ".deepspeed_env", Path(".deepspeed_env")):
        if own.is_file():
            lines += [line for line in own.read_text().splitlines() if line.strip()]
    path = Path(path)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


@dataclass
class RankFailure:
    """The first error a torchrun worker recorded in its error file."""

    local_rank: int
    """The worker's rank on its node (its folder under the attempt's log dir)."""
    message: str
    """`ExceptionType: message` as the worker's `@record` wrote it."""


def first_failure(log_dir: str | Path) -> RankFailure | None:
    """The earliest error file written in torchrun's last attempt under `log_dir` (the cause: the
    other ranks' errors follow from it); None when no worker wrote one (killed by a signal)."""
    attempts = sorted(Path(log_dir).glob("*/attempt_*"), key=lambda p: int(p.name.removeprefix("attempt_")))
    files = list(attempts[-1].glob("*/error.json")) if attempts else []
    if not files:
        return None
    path = min(files, key=lambda p: p.stat().st_mtime_ns)
    message = json.loads(path.read_text())["message"]
    return RankFailure(int(path.parent.name), message["message"] if isinstance(message, dict) else str(message))


def launch_error(stage: str, launcher: str, returncode: int, log_dir: str | Path | None = None,
                 node: str | None = None) -> DgptError:
    """The one-line error of a failed launch: `<stage>: rank R failed: <error>` from torchrun's
    error files under `log_dir` (with `node`, one of several nodes: the node and the worker's
    local rank), else the launcher and its exit code."""
    failure = first_failure(log_dir) if log_dir is not None else None
    if failure is None:
        return DgptError(f"{stage}: the {launcher} launch failed with exit code {returncode}",
                         hint="the failing rank's traceback is in the launch output above")
    who = f"node {node} local rank {failure.local_rank}" if node else f"rank {failure.local_rank}"
    return DgptError(f"{stage}: {who} failed: {one_line(failure.message) or 'no message'}",
                     hint="its traceback is in the launch output above")
