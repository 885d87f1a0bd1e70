"""Multi-node training on this machine, two "nodes" on loopback, one CPU process each, and the
failures of launched runs.

- The deepspeed launcher with a hostfile starts both nodes over ssh (pdsh) against a private
  sshd on a free loopback port (generated host and client keys; an `ssh` on PATH that reads its
  config, as a user's ~/.ssh/config would). The Debian packages openssh-server and pdsh are
  installed when missing; without them (no root, no package registry) the test is skipped.
- Two `dgpt train-node` processes meet at a c10d rendezvous on loopback.
Both give the per-step losses of one process with gradient accumulation 2 (same global batch).
- The flow refuses a multi-node torchrun stage at once instead of waiting at the rendezvous.
- torchrun --max-restarts: `kill -9` of one rank restarts both from the last complete
  checkpoint and ends with the losses of an uninterrupted run.
- A checkpoint file only rank 1 reads is corrupt: rank 1 fails, rank 0 is stopped, and the stage
  raises one line naming the rank and the error.
- (slow) A rank that hangs (SIGSTOP) makes the others fail after ddp_timeout, also at ZeRO's own
  collectives, and the stage ends.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from dgpt_core.cli_errors import ConfigError, DgptError
from dgpt_core.config import load_run_config
from dgpt_core.data.stages import prepare_all
from dgpt_core.training.stage import free_port
from dgpt_core.training.trainer import COMPLETE_MARKER
from tasks.launch import run_training_stage

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["pretrain.max_steps=4", "pretrain.save_steps=2", "pretrain.logging_steps=1", "pretrain.eval_steps=null",
         "pretrain.per_device_batch_size=4"]
"""A 4-step ZeRO-2 pretraining stage of the ci preset, a checkpoint every 2 steps."""
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def cpu_env(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def ci_data(tmp_path_factory):
    """The ci preset's data folders (`dgpt prepare` layout: tokenizer/, pretrain/, sft/)."""
    run = load_run_config("ci")
    root = tmp_path_factory.mktemp("data")
    prepare_all(run.data, run.tokenizer, run.model.max_seq_len, root)
    return root


def step_losses(out_dir: Path) -> dict[int, float]:
    """Per-step training loss of a stage, from its last checkpoint's trainer state."""
    last = max((out_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def one_process_losses(data: Path, out_dir: Path, overrides: list[str]) -> dict[int, float]:
    """The stage in this process with gradient accumulation 2: the global batch of two ranks."""
    run = load_run_config("ci", [*overrides, "pretrain.gradient_accumulation_steps=2"])
    with pytest.MonkeyPatch.context() as env:
        for key in DISTRIBUTED_ENV:  # the one-process group's variables must not leak into later launches
            env.delenv(key, raising=False)
        run_training_stage(run, "pretrain", str(data / "pretrain"), str(data / "tokenizer"), str(out_dir), None, {})
    return step_losses(out_dir)


@pytest.fixture(scope="module")
def reference_losses(ci_data, tmp_path_factory):
    return one_process_losses(ci_data, tmp_path_factory.mktemp("ga2"), SMALL)


def assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected), (got, expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)


def installed(*programs: str) -> bool:
    return all(shutil.which(p) or Path("/usr/sbin", p).exists() for p in programs)


@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory):
    """sshd on a free loopback port with generated keys, a `bin/` whose `ssh` logs into it without
    prompts (put it first on PATH), and a hostfile naming two loopback hosts, one slot each."""
    if not installed("sshd", "pdsh"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("needs openssh-server and pdsh (apt-get install -y openssh-server pdsh as root)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server", "pdsh"], env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode or not installed("sshd", "pdsh"):
            pytest.skip(f"could not install openssh-server and pdsh: {done.stderr.strip()[-300:]}")
    ssh = shutil.which("ssh")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory, normally made by its service
    root = tmp_path_factory.mktemp("ssh")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\n")
    (root / "ssh_config").write_text(
        f"Host *\n  Port {port}\n  IdentityFile {root / 'client_key'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    (root / "bin").mkdir()
    (root / "bin" / "ssh").write_text(f'#!/bin/sh\nexec {ssh} -F {root / "ssh_config"} "$@"\n')
    (root / "bin" / "ssh").chmod(0o755)
    (root / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    server = subprocess.Popen([sshd, "-D", "-e", "-f", str(root / "sshd_config")], stderr=open(root / "sshd.log", "w"))
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([str(root / "bin" / "ssh"), "127.0.0.1", "true"], capture_output=True).returncode:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not accept the key: {(root / 'sshd.log').read_text()[-1000:]}")
            time.sleep(0.2)
        yield root
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow  # ~50 s, and on a fresh machine an apt install of openssh-server and pdsh first
def test_deepspeed_hostfile_starts_both_nodes_over_ssh(ssh_nodes, ci_data, reference_losses, tmp_path, monkeypatch,
                                                      capfd):
    monkeypatch.setenv("PATH", f"{ssh_nodes / 'bin'}:{os.environ['PATH']}")
    monkeypatch.chdir(ROOT)  # the launcher starts every node in its working directory
    run = load_run_config("ci", [*SMALL, "pretrain.launcher=deepspeed", "pretrain.num_nodes=2",
                                 f"pretrain.hostfile={ssh_nodes / 'hostfile'}",
                                 f"pretrain.rdzv_endpoint=127.0.0.1:{free_port()}"])
    result = run_training_stage(run, "pretrain", str(ci_data / "pretrain"), str(ci_data / "tokenizer"),
                                str(tmp_path / "pretrain"), None, {}, resume=False)
    assert result["metrics"]["world_size"] == 2
    assert_same_losses(step_losses(tmp_path / "pretrain"), reference_losses)
    captured = capfd.readouterr()
    lines = (captured.out + captured.err).splitlines()
    for rank, host in enumerate(["localhost", "127.0.0.1"]):  # pdsh prefixes each host's output with its name
        assert any(line.startswith(f"{host}: ") and f"node_rank={rank}" in line for line in lines), host


def train_node(data: Path, out_dir: Path, endpoint: str, *extra: str) -> subprocess.Popen:
    """One node's `dgpt train-node` of the SMALL stage (2 nodes, c10d rendezvous at `endpoint`)."""
    sets = [arg for item in SMALL for arg in ("--set", item)]
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "train-node", "--preset", "ci", *sets, "--stage", "pretrain",
                             "--nnodes", "2", "--rdzv-endpoint", endpoint, "--data-dir", str(data),
                             "--out-dir", str(out_dir), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def two_train_nodes(ci_data, tmp_path_factory):
    """The SMALL stage run by two `dgpt train-node` processes: (their outputs, the stage folder)."""
    out_dir = tmp_path_factory.mktemp("train-node") / "pretrain"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [train_node(ci_data, out_dir, endpoint, "--fresh") for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    return outputs, out_dir


def test_train_node_on_every_node_meets_at_the_rendezvous(two_train_nodes, reference_losses):
    outputs, out_dir = two_train_nodes
    for output in outputs:
        summary = next(line for line in output.splitlines() if line.startswith("pretrain: {"))
        assert json.loads(summary.removeprefix("pretrain: "))["world_size"] == 2
    assert_same_losses(step_losses(out_dir), reference_losses)


def test_the_flow_refuses_a_multi_node_torchrun_stage_at_once(ci_data, tmp_path):
    run = load_run_config("ci", [*SMALL, "pretrain.num_nodes=2", "pretrain.rdzv_endpoint=127.0.0.1:29400"])
    start = time.monotonic()
    with pytest.raises(ConfigError) as failure:
        run_training_stage(run, "pretrain", str(ci_data / "pretrain"), str(ci_data / "tokenizer"),
                           str(tmp_path / "pretrain"), None, {})
    assert time.monotonic() - start < 5
    message = str(failure.value)
    assert "\n" not in message and "launcher=deepspeed with a hostfile" in message and "dgpt train-node" in message


def worker(agent: psutil.Process, local_rank: int) -> psutil.Process | None:
    """The training process of `local_rank` among the children of a torchrun agent."""
    for child in agent.children():
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank):
                return child
        except psutil.NoSuchProcess:
            pass
    return None


def test_a_killed_rank_restarts_the_job_from_the_last_complete_checkpoint(ci_data, tmp_path, capfd):
    stage = ["pretrain.max_steps=16", "pretrain.save_steps=4", "pretrain.logging_steps=1", "pretrain.eval_steps=null",
             "pretrain.per_device_batch_size=8"]
    expected = one_process_losses(ci_data, tmp_path / "uninterrupted", stage)
    run = load_run_config("ci", [*stage, "pretrain.num_processes=2", "pretrain.max_restarts=1"])
    out_dir = tmp_path / "pretrain"
    outcome: dict = {}

    def launch():
        try:
            outcome["result"] = run_training_stage(run, "pretrain", str(ci_data / "pretrain"), str(ci_data / "tokenizer"),
                                                   str(out_dir), None, {}, resume=False)
        except Exception as err:  # reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=launch)
    thread.start()
    first = out_dir / "checkpoints" / "checkpoint-4" / COMPLETE_MARKER
    deadline = time.monotonic() + 300
    while not first.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.exists(), outcome
    agent = next(p for p in psutil.Process().children() if "torch.distributed.run" in " ".join(p.cmdline()))
    rank0, rank1 = worker(agent, 0), worker(agent, 1)
    # rank 0 paused, training cannot run past the next step; rank 1 meanwhile writes its own files
    # of the checkpoint (rank 0 marks it without waiting for them) and waits at the next collective
    rank0.suspend()
    time.sleep(0.5)
    rank1.send_signal(signal.SIGKILL)
    rank0.resume()
    thread.join(timeout=600)
    assert "error" not in outcome, outcome["error"]
    assert outcome["result"]["metrics"]["steps"] == 16
    log = capfd.readouterr()
    output = log.out + log.err
    # torchrun names the failure it recorded first: rank 1's SIGKILL, or rank 0's collective that
    # broke with it when that was noticed first
    assert re.search(r"failed \(exitcode: (-9|1)\) local_rank: [01] ", output), output[-3000:]
    assert "torchrun restart 1: pretrain resumes from its last complete checkpoint" in output
    assert "resuming pretrain from" in output
    assert_same_losses(step_losses(out_dir), expected)


def test_a_failing_rank_stops_every_rank_and_the_stage_names_it(two_train_nodes, ci_data, tmp_path):
    _, finished = two_train_nodes
    out_dir = tmp_path / "pretrain"
    shutil.copytree(finished, out_dir)
    last = out_dir / "checkpoints" / "checkpoint-4"
    rng = last / "rng_state_1.pth"  # read by rank 1 alone when it resumes
    rng.write_bytes(rng.read_bytes()[:100])
    run = load_run_config("ci", [*SMALL, "pretrain.max_steps=6", "pretrain.num_processes=2", "pretrain.ddp_timeout=60"])
    start = time.monotonic()
    with pytest.raises(DgptError) as failure:
        run_training_stage(run, "pretrain", str(ci_data / "pretrain"), str(ci_data / "tokenizer"), str(out_dir), None,
                           {}, resume=True)
    assert time.monotonic() - start < 120
    message = str(failure.value)
    assert message.startswith("pretrain: rank 1 failed: RuntimeError: "), message
    assert "\n" not in message
    assert not [p for p in psutil.Process().children(recursive=True) if "dgpt_core.training.stage" in " ".join(p.cmdline())]


@pytest.mark.slow  # ~45 s: the 10 s timeout, then torchrun's 30 s between SIGTERM and SIGKILL of the hung rank
def test_a_hung_rank_ends_the_job_after_ddp_timeout(ci_data, tmp_path):
    run = load_run_config("ci", ["pretrain.max_steps=16", "pretrain.save_steps=4", "pretrain.logging_steps=1",
                                 "pretrain.eval_steps=null", "pretrain.num_processes=2", "pretrain.ddp_timeout=10"])
    out_dir = tmp_path / "pretrain"
    outcome: dict = {}

    def launch():
        try:
            run_training_stage(run, "pretrain", str(ci_data / "pretrain"), str(ci_data / "tokenizer"), str(out_dir),
                               None, {}, resume=False)
        except Exception as err:  # checked below
            outcome["error"] = err

    thread = threading.Thread(target=launch)
    thread.start()
    first = out_dir / "checkpoints" / "checkpoint-4" / COMPLETE_MARKER
    while not first.exists() and thread.is_alive():
        time.sleep(0.02)
    agent = next(p for p in psutil.Process().children() if "torch.distributed.run" in " ".join(p.cmdline()))
    worker(agent, 1).suspend()  # alive but never reaching the next all-reduce (ZeRO's own process group)
    start = time.monotonic()
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert time.monotonic() - start < 10 + 30 + 20
    message = str(outcome["error"])
    assert message.startswith("pretrain: rank 0 failed: RuntimeError: ") and "Timed out" in message, message


@pytest.mark.slow  # ~1 min: a ZeRO-3 reference and two more train-node processes
def test_two_zero3_nodes_train_like_one_process_accumulating_two(ci_data, tmp_path):
    zero3 = "pretrain.deepspeed=zero3"
    expected = one_process_losses(ci_data, tmp_path / "ga2", [*SMALL, zero3])
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [train_node(ci_data, tmp_path / "pretrain", endpoint, "--fresh", "--set", zero3) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    got = step_losses(tmp_path / "pretrain")
    print("zero3 losses: 1 process GA2", expected, "| 2 train-nodes", got)
    assert_same_losses(got, expected)
