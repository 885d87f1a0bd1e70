"""`dgpt train-node`: this node's part of a multi-node training stage, for schedulers that start
the same command once on every node (Slurm `srun`, a Kubernetes indexed Job):

    dgpt train-node --preset fineweb [--set ...] --stage pretrain --nnodes 2 --rdzv-endpoint node0:29500 \\
        [--rdzv-id $SLURM_JOB_ID] [--data-dir DIR] [--out-dir DIR] [--init-model-dir DIR] [--fresh]

Each node runs torchrun with the stage's num_processes processes and max_restarts; the nodes meet
at the c10d rendezvous at --rdzv-endpoint (a host:port every node reaches; the node that owns that
address hosts it) under the same --rdzv-id, and torchrun numbers the ranks. Every node reads the
tokenizer and the stage's dataset from --data-dir (the folders `dgpt prepare` writes) and writes
to --out-dir, which must be one folder shared by all nodes: each rank saves its part of a
checkpoint, rank 0 the model. A rerun resumes from the last complete checkpoint (--fresh starts
over); a failed rank ends every node's run, each reporting the first error on its node.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path

from ..cli_errors import UsageError
from ..config import add_config_arguments


def add_train_node_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train-node", help="run this node's part of a multi-node training stage",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--stage", choices=("pretrain", "sft"), required=True, help="the training stage to run")
    parser.add_argument("--nnodes", type=int, default=None, help="number of nodes (default: the stage's num_nodes)")
    parser.add_argument("--rdzv-endpoint", default=None,
                        help="host:port of the rendezvous, the same on every node (default: the stage's rdzv_endpoint)")
    parser.add_argument("--rdzv-id", default="dgpt", help="job id, the same on every node (e.g. $SLURM_JOB_ID)")
    parser.add_argument("--data-dir", default=None,
                        help="`dgpt prepare` folder holding tokenizer/ and the stage's dataset "
                             "(default: <output_dir>/<preset>/data)")
    parser.add_argument("--out-dir", default=None, help="shared stage folder (default: <output_dir>/<preset>/<stage>)")
    parser.add_argument("--init-model-dir", default=None,
                        help="model folder to start from (default: the stage's init_from, else a fresh model)")
    parser.add_argument("--fresh", action="store_true", help="start clean instead of resuming from a checkpoint")
    parser.set_defaults(func=run_train_node)
    return parser


def run_train_node(args: argparse.Namespace) -> int:
    from ..config import FOLDER_CONFIG_NAME, load_run_config

    run = load_run_config(args.preset, args.overrides)
    cfg = getattr(run, args.stage)
    nnodes = args.nnodes or cfg.num_nodes
    endpoint = args.rdzv_endpoint or cfg.rdzv_endpoint
    if nnodes > 1 and not endpoint:
        raise UsageError("several nodes need --rdzv-endpoint host:port (or the stage's rdzv_endpoint)")
    root = Path(run.output_dir) / run.preset
    data_dir = Path(args.data_dir) if args.data_dir else root / "data"
    out_dir = Path(args.out_dir) if args.out_dir else root / args.stage
    for folder in (data_dir / "tokenizer", data_dir / args.stage):
        if not folder.is_dir():
            raise UsageError(f"{folder} does not exist: run `dgpt prepare` with the same preset first")

    from ..training.launch import TORCHRUN_ENV, launch_error, torchrun_command

    run_config_path = run.save_yaml(out_dir / FOLDER_CONFIG_NAME)
    module_args = ["--run-config", str(run_config_path), "--stage", args.stage,
                   "--dataset-dir", str((data_dir / args.stage).resolve()),
                   "--tokenizer-dir", str((data_dir / "tokenizer").resolve()), "--out-dir", str(out_dir.resolve())]
    if not args.fresh:
        module_args.append("--resume")
    if args.init_model_dir:
        module_args += ["--init-model-dir", args.init_model_dir]
    with tempfile.TemporaryDirectory(prefix="dgpt-train-node-") as log_dir:
        cmd = torchrun_command(cfg, module_args, nnodes=nnodes, rdzv_endpoint=endpoint, rdzv_id=args.rdzv_id,
                               log_dir=log_dir)
        returncode = subprocess.run(cmd, env={**os.environ, **TORCHRUN_ENV}).returncode
        if returncode:
            raise launch_error(args.stage, "torchrun", returncode, log_dir,
                               node=socket.gethostname() if nnodes > 1 else None)
    metrics = json.loads((out_dir / "stage_result.json").read_text())["metrics"]  # rank 0's, in the shared folder
    print(f"{args.stage}: {json.dumps({k: metrics.get(k) for k in ('train_loss', 'steps', 'world_size')})}")
    print(f"model: {out_dir / 'model'}")
    return 0
