"""prefect.yaml and the deploy/prefect scripts: the file names the deployments with the real flows,
and the real deployment cycle against one local Prefect server on 127.0.0.1 (server, work pools,
`prefect deploy --all`, process workers): `prefect deployment run pretrain-sft/smoke --watch` ends
Completed, then stop.sh stops everything by PID. Slow: two runs of `full` submitted together run
one after the other (its concurrency limit); a sweep deployment runs its trials on the pool."""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from .conftest import QUIET_OFFLINE

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "deploy" / "prefect"
SWEEP_ENTRYPOINT = "flows/sweep.py:sweep"
ENTRYPOINT = "flows/pretrain_sft.py:pretrain_sft"


# A short but complete run of the real flow: every stage (data, pretrain, SFT, eval, publish dry
# run) of the ci preset, with 2 training steps and a reduced eval, passed as deployment parameters.
SMOKE_OVERRIDES = [
    "pretrain.max_steps=2",
    "sft.max_steps=2",
    "tracking.enabled=false",
    "eval_models=[sft]",
    "eval.tasks=[ppl,dgpt_skills]",
    "eval.strategies=[confidence]",
    "eval.limit=1",
    "eval.steps=4",
    "eval.steps_grid=[4]",
    "eval.ppl_t_points=2",
    "eval.ppl_mask_draws=1",
]


def _config() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in _config()["deployments"]}


# --------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_names_the_deployments_of_the_real_flows():
    from flows.pretrain_sft import pretrain_sft
    from flows.sweep import sweep

    deployments = _deployments()
    assert set(deployments) == {"full", "smoke", "trial", "tiny-sft"}
    flows = {"pretrain_sft": pretrain_sft, "sweep": sweep}
    for name, dep in deployments.items():
        path, _, func = dep["entrypoint"].partition(":")
        assert (ROOT / path).is_file() and dep["entrypoint"] == (ENTRYPOINT if func == "pretrain_sft" else SWEEP_ENTRYPOINT)
        assert set(dep["parameters"]) <= set(inspect.signature(flows[func].fn).parameters), name
        assert dep["work_pool"]["name"] == {"full": "gpu-pool", "smoke": "cpu-pool", "trial": "gpu-pool",
                                            "tiny-sft": "cpu-pool"}[name]
    assert deployments["trial"]["work_pool"] == deployments["full"]["work_pool"]  # the same GPU job variables
    # the pull step runs the flow from the worker's checkout
    (step,) = _config()["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DGPT_ROOT }}"}}


def test_the_sweep_deployment_fans_its_trials_out_as_runs_of_the_trial_deployment():
    from dgpt_core.config import load_run_config
    from dgpt_core.config.sweep import check_keys, parse_dimension

    params = _deployments()["tiny-sft"]["parameters"]
    assert params["trial_deployment"] == "pretrain-sft/trial" and params["max_parallel"] > 1
    base = load_run_config(params["preset"], params["overrides"])
    check_keys(base, [parse_dimension(d) for d in params["grid"]], "sft.seed")


def test_the_full_deployment_is_gpu_production_with_a_guarded_schedule():
    from prefect.client.schemas.schedules import CronSchedule

    from dgpt_core.config import load_run_config

    full = _deployments()["full"]
    assert full["parameters"]["preset"] == "fineweb"
    assert load_run_config(full["parameters"]["preset"], full["parameters"]["overrides"]).preset == "fineweb"
    assert full["concurrency_limit"]["limit"] == 1
    (schedule,) = full["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # validates the cron expression
    assert schedule["active"] is False  # a fresh server never starts GPU jobs unasked
    env = full["work_pool"]["job_variables"]["env"]
    assert env["DS_ACCELERATOR"] == "cuda" and env["CUDA_VISIBLE_DEVICES"]
    assert all(isinstance(v, str) for v in env.values())


def test_the_smoke_deployment_is_the_ci_preset_offline_on_cpu():
    from dgpt_core.config import load_run_config

    smoke = _deployments()["smoke"]
    assert smoke["parameters"]["preset"] == "ci"
    load_run_config("ci", SMOKE_OVERRIDES)  # the test's overrides are valid
    env = smoke["work_pool"]["job_variables"]["env"]
    assert env["DS_ACCELERATOR"] == "cpu" and env["HF_HUB_OFFLINE"] == "1"
    assert smoke["concurrency_limit"] == 1 and not smoke.get("schedules")


SCRIPT_FILES = sorted(SCRIPTS.glob("*.sh"))
STRICT = "set -euo pipefail"


def _first_command(text: str) -> str:
    """The first line of a script that is neither blank nor a comment (nor the shebang)."""
    return next(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


@pytest.mark.parametrize("script", SCRIPT_FILES, ids=lambda p: p.name)
def test_every_script_is_valid_bash_and_turns_on_strict_mode_first(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert _first_command(script.read_text()) == STRICT, f"{script.name} must start with `{STRICT}` itself"
    if script.name != "common.sh":  # sourced, never run
        assert script.read_text().startswith("#!/usr/bin/env bash\n") and os.access(script, os.X_OK), script.name


@pytest.mark.parametrize("script", [p for p in SCRIPT_FILES if p.name != "common.sh"], ids=lambda p: p.name)
def test_strict_mode_is_in_force_before_the_script_runs_anything(script, tmp_path):
    """The script runs beside a stand-in common.sh that reports the shell options it is sourced
    under: errexit, nounset and pipefail must already be on (not just set later by common.sh)."""
    (tmp_path / script.name).write_text(script.read_text())
    (tmp_path / "common.sh").write_text('echo "flags=$-"\n'
                                        'echo "pipefail=$(shopt -qo pipefail && echo on || echo off)"\nexit 0\n')
    out = subprocess.run(["bash", str(tmp_path / script.name)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    flags = dict(line.split("=", 1) for line in out.stdout.split())
    assert "e" in flags["flags"] and "u" in flags["flags"] and flags["pipefail"] == "on", (script.name, flags)


@pytest.mark.parametrize("args", [["server.sh", "bogus"], ["stop.sh", "--worker"], ["worker.sh"],
                                  ["worker.sh", "cpu-pool", "--bogus"]], ids=" ".join)
def test_bad_arguments_exit_2_with_usage(args, tmp_path):
    env = {**os.environ, "DGPT_PREFECT_DIR": str(tmp_path / "state")}
    out = subprocess.run(["bash", str(SCRIPTS / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("usage: "), (out.returncode, out.stderr)


def test_a_script_without_a_server_fails_with_one_clear_error(tmp_path):
    """pools.sh / deploy.sh with no server started and no PREFECT_API_URL: exit 1 and say how to start one."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"DGPT_PREFECT_DIR": str(tmp_path / "state")})
    for script in ("pools.sh", "deploy.sh"):
        out = subprocess.run(["bash", str(SCRIPTS / script)], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 1, (script, out.returncode, out.stderr)
        assert out.stderr.strip().splitlines()[-1] == (
            "[dgpt-prefect] error: no Prefect server: start one with deploy/prefect/server.sh start "
            "(or set PREFECT_API_URL)"), out.stderr


# --------------------------------------------------------------------------- the real cycle


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive either
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


class LocalPrefect:
    """The deploy/prefect scripts, run with an isolated state folder, PREFECT_HOME and port."""

    def __init__(self, state: Path):
        self.state = state
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DGPT_ROOT"}
        venv_bin = str(Path(sys.executable).parent)
        env.update(QUIET_OFFLINE)
        env.update({
            "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
            "VIRTUAL_ENV": sys.prefix,
            "DGPT_PREFECT_DIR": str(state),
            "PREFECT_HOME": str(state / "home"),
            "DGPT_PREFECT_PORT": str(_free_port()),
            "DGPT_PREFECT_TIMEOUT": "120",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            # a run held back by a deployment concurrency limit is offered again at the worker's
            # next poll instead of 30 s later
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
            # built DeepSpeed ops and HF caches are reused across test runs (git-ignored .cache/)
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),
            "HF_HOME": os.environ.get("HF_HOME", str(ROOT / ".cache" / "huggingface")),
        })
        self.env = env

    def sh(self, script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", str(SCRIPTS / script), *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{script} {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{self.logs()}"
        return proc

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**self.env, "PREFECT_API_URL": self.api_url}
        return subprocess.run(["prefect", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    @property
    def api_url(self) -> str:
        return (self.state / "api_url").read_text().strip()

    def pids(self) -> dict[str, int]:
        found = {}
        for path in self.state.glob("*.pid"):
            text = path.read_text().strip()
            if text.isdigit():
                found[path.stem] = int(text)
        return found

    def logs(self, lines: int = 40) -> str:
        parts = []
        for path in sorted(self.state.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    def teardown(self) -> None:
        """stop.sh; then, whatever it left, SIGKILL by the recorded PIDs (their process groups)."""
        pids = self.pids()
        try:
            subprocess.run(["bash", str(SCRIPTS / "stop.sh")], cwd=ROOT, env=self.env, timeout=120,
                           capture_output=True)
        except (OSError, subprocess.SubprocessError):
            pass  # the PIDs below are killed regardless
        for pid in pids.values():
            if _alive(pid):
                for kill in (lambda p: os.killpg(p, signal.SIGKILL), lambda p: os.kill(p, signal.SIGKILL)):
                    try:
                        kill(pid)
                    except (ProcessLookupError, PermissionError):
                        pass

    def query(self, script: str, *args: str, timeout: float = 120):
        """Run a Python snippet against the server (`prefect.get_client` sees its PREFECT_API_URL) and
        return the JSON it prints last."""
        proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                              env={**self.env, "PREFECT_API_URL": self.api_url}, timeout=timeout)
        assert proc.returncode == 0, f"{proc.stderr}\n{self.logs()}"
        return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def local_prefect(tmp_path_factory):
    """One server for the module's deployment runs, with both work pools and both deployments;
    test_stop_sh_stops_the_workers_and_the_server_by_pid (the module's last test) stops it, and
    teardown kills whatever is left."""
    stack = LocalPrefect(tmp_path_factory.mktemp("prefect"))
    try:
        # server.sh start prints the API URL it wrote for the other scripts
        assert stack.sh("server.sh", "start").stdout.strip().splitlines()[-1] == stack.api_url
        stack.sh("pools.sh")
        stack.sh("deploy.sh")
        yield stack
    finally:
        stack.teardown()


def _flow_run_id(cli_output: str) -> str:
    return re.search(r"UUID: ([0-9a-f-]{36})", cli_output).group(1)


def test_the_scripts_start_a_server_with_both_work_pools(local_prefect):
    stack = local_prefect
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api", stack.api_url)
    status = stack.sh("server.sh", "status").stdout
    assert f"running: PID {stack.pids()['server']}, PREFECT_API_URL={stack.api_url}" in status
    stack.sh("server.sh", "start")  # idempotent: reports the running server
    assert (stack.state / "home").is_dir()
    pools = stack.cli("work-pool", "ls")
    assert pools.returncode == 0 and "cpu-pool" in pools.stdout and "gpu-pool" in pools.stdout


def test_smoke_deployment_runs_to_completed_through_a_worker(local_prefect, tmp_path):
    stack = local_prefect
    stack.sh("worker.sh", "cpu-pool")
    assert _alive(stack.pids()["worker-cpu-pool"])

    out_dir = tmp_path / "runs"
    run = stack.cli("deployment", "run", "pretrain-sft/smoke", "--watch", "--watch-timeout", "540",
                    "--param", f"output_dir={out_dir}", "--param", f"overrides={json.dumps(SMOKE_OVERRIDES)}",
                    "--param", "run_name=smoke")
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{stack.logs(80)}"
    assert "Flow run finished successfully in 'Completed'" in run.stdout

    # the flow run as the server recorded it: Completed, from the smoke deployment, on cpu-pool
    flow_run_id = _flow_run_id(run.stdout)
    flow_run = stack.query(
        "import json, sys, uuid\n"
        "from prefect import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    fr = c.read_flow_run(uuid.UUID(sys.argv[1]))\n"
        "    dep = c.read_deployment(fr.deployment_id)\n"
        "    print(json.dumps({'state': fr.state.type.value, 'deployment': dep.name,\n"
        "                      'pool': fr.work_pool_name, 'params': fr.parameters}))\n",
        flow_run_id)
    assert flow_run["state"] == "COMPLETED"
    assert flow_run["deployment"] == "smoke" and flow_run["pool"] == "cpu-pool"
    assert flow_run["params"]["preset"] == "ci" and flow_run["params"]["overrides"] == SMOKE_OVERRIDES

    # the worker ran it from the checkout (pull step) and the flow wrote its run summary
    worker_log = (stack.state / "worker-cpu-pool.log").read_text(errors="replace")
    assert "set_working_directory' completed successfully" in worker_log
    summary = json.loads((out_dir / "smoke" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["preset"] == "ci"
    assert summary["flow_run_id"] == flow_run_id
    assert {"data", "pretrain", "sft", "eval-sft", "publish"} <= set(summary["wall_time_s"])


# Polls the server until every flow run given is in a final state (or the deadline passes), then
# prints each run's record and the names of the states it went through.
WAIT_FOR_RUNS = """
import json, sys, time, uuid
from prefect import get_client
deadline = time.monotonic() + float(sys.argv[1])
with get_client(sync_client=True) as c:
    while True:
        runs = [c.read_flow_run(uuid.UUID(i)) for i in sys.argv[2:]]
        if all(r.state.is_final() for r in runs) or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(json.dumps([{"state": r.state.type.value, "pool": r.work_pool_name,
                       "deployment": c.read_deployment(r.deployment_id).name,
                       "start": r.start_time and r.start_time.isoformat(),
                       "end": r.end_time and r.end_time.isoformat(),
                       "states": [s.name for s in c.read_flow_run_states(r.id)]} for r in runs]))
"""


@pytest.mark.slow
def test_two_runs_of_the_full_deployment_are_serialized_by_its_concurrency_limit(local_prefect, tmp_path):
    """Two runs of `full` submitted back to back, on a gpu-pool worker that would run both at once:
    the second waits in AwaitingConcurrencySlot until the first has finished. The runs use the CPU
    and the smoke deployment's offline env (a per-run job variable), the `ci` preset and only the
    data stage, with separate output folders so that nothing but the limit orders them."""
    stack = local_prefect
    stack.sh("worker.sh", "gpu-pool")
    cpu_env = json.dumps(_deployments()["smoke"]["work_pool"]["job_variables"]["env"])
    runs = {}
    for name in ("first", "second"):
        run = stack.cli("deployment", "run", "pretrain-sft/full", "--job-variable", f"env={cpu_env}",
                        "--param", "preset=ci", "--param", 'only=["data"]',
                        "--param", 'overrides=["tracking.enabled=false"]',
                        "--param", f"output_dir={tmp_path / name}", "--param", f"run_name={name}")
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
        runs[name] = _flow_run_id(run.stdout)

    records = stack.query(WAIT_FOR_RUNS, "300", *runs.values(), timeout=330)
    assert all(r["state"] == "COMPLETED" for r in records), f"{records}\n{stack.logs(80)}"
    assert all(r["deployment"] == "full" and r["pool"] == "gpu-pool" for r in records), records
    earlier, later = sorted(records, key=lambda r: r["start"])
    assert datetime.fromisoformat(later["start"]) >= datetime.fromisoformat(earlier["end"]), records
    assert "AwaitingConcurrencySlot" in later["states"], records
    for name, flow_run_id in runs.items():
        summary = json.loads((tmp_path / name / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["flow_run_id"] == flow_run_id


@pytest.mark.slow
def test_a_sweep_deployment_runs_its_trials_as_deployment_runs_on_the_pool(local_prefect, tmp_path):
    """`sweep/tiny-sft` with the `ci` preset and pretrain-sft/smoke (CPU) as the trial deployment:
    the sweep's flow run and its two trials run through the cpu-pool worker, each trial a run of the
    deployment nested under the sweep's, sharing the data and pretraining stages."""
    stack = local_prefect
    stack.sh("worker.sh", "cpu-pool")
    run = stack.cli("deployment", "run", "sweep/tiny-sft", "--watch", "--watch-timeout", "540",
                    "--param", "preset=ci", "--param", f"output_dir={tmp_path}", "--param", "name=pool-sweep",
                    "--param", 'grid=["sft.learning_rate=1e-3,3e-4"]', "--param", "seeds=[0]",
                    "--param", "metric=train/sft/val_elbo", "--param", "trial_deployment=pretrain-sft/smoke",
                    "--param", f"overrides={json.dumps(SMOKE_OVERRIDES)}", timeout=600)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{stack.logs(80)}"
    summary = json.loads((tmp_path / "sweeps" / "pool-sweep" / "sweep.json").read_text())
    assert summary["counts"]["completed"] == 2, summary["trials"]
    assert summary["cache"]["stages"]["pretrain"] == {**summary["cache"]["stages"]["pretrain"], "executed": 1,
                                                      "cache_hits": 1}
    # every run of the trial deployment hangs off a task run of the sweep's flow run (Prefect's nesting)
    children = stack.query(
        "import json, sys, uuid\n"
        "from prefect import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    runs = [r for r in c.read_flow_runs() if r.parent_task_run_id]\n"
        "    print(json.dumps([[c.read_deployment(r.deployment_id).name, r.state.type.value,\n"
        "                       str(c.read_task_run(r.parent_task_run_id).flow_run_id) == sys.argv[1]] for r in runs]))\n",
        _flow_run_id(run.stdout))
    assert sorted(children) == [["smoke", "COMPLETED", True], ["smoke", "COMPLETED", True]], children


def test_stop_sh_stops_the_workers_and_the_server_by_pid(local_prefect):
    """Last in the module: it stops the module's server."""
    stack = local_prefect
    pids = stack.pids()
    assert "server" in pids and all(map(_alive, pids.values())), pids
    stack.sh("stop.sh", timeout=120)
    assert not any(map(_alive, pids.values()))
    assert not stack.pids()
