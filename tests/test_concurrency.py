"""Concurrent runs into one output root: stage claims, stage completion markers, the MLflow
database created once, artifacts beside it, runs of killed processes closed, and two real
concurrent `dgpt run`s that train each stage once."""

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dgpt_core.config import TrackingConfig
from flows.stage_lock import StageBusyError, claim
from flows.tracking import Tracker
from tasks.stage_folders import STAGE_MARKER, building, is_complete

ROOT = Path(__file__).resolve().parents[1]


def test_a_claimed_stage_fails_at_once_without_waiting_and_names_the_holder(tmp_path):
    lock = tmp_path / "stages" / "pretrain-abc.lock"
    with claim(lock, "stage pretrain", "holder-run"):
        with pytest.raises(StageBusyError, match=r"stage pretrain is being built by run 'holder-run' \(pid \d+"):
            with claim(lock, "stage pretrain", "second-run", wait=False):
                pass
    with claim(lock, "stage pretrain", "second-run", wait=False):  # free again
        pass


def test_a_waiting_claim_proceeds_when_the_holder_releases(tmp_path, capsys):
    lock, order = tmp_path / "sft.lock", []
    held = threading.Event()

    def holder():
        with claim(lock, "stage sft", "first"):
            held.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    with claim(lock, "stage sft", "second"):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]
    assert "stage sft: waiting for run 'first'" in capsys.readouterr().out


def test_a_stage_folder_is_marked_only_when_its_build_returns(tmp_path):
    folder = tmp_path / "eval-123"
    with building(folder):
        (folder / "metrics.json").write_text("{}")
        (folder / "plots").mkdir()
        (folder / "plots" / "a.png").write_bytes(b"png")
        assert not is_complete(folder)
    assert is_complete(folder)
    assert json.loads((folder / STAGE_MARKER).read_text())["files"] == ["metrics.json", "plots/a.png"]

    with pytest.raises(RuntimeError), building(folder):  # a rebuild that dies leaves no marker
        (folder / "metrics.json").write_text('{"half": ')
        raise RuntimeError("killed")
    assert not is_complete(folder)

    with building(folder):
        pass
    (folder / "metrics.json").unlink()  # a listed file gone: not complete
    assert not is_complete(folder)


def _open_tracker(root: str, queue) -> None:
    try:
        tracker = Tracker(TrackingConfig(), Path(root))
        queue.put(("ok", tracker.experiment_id))
    except Exception as err:  # noqa: BLE001 - reported to the test
        queue.put(("error", repr(err)))


def test_processes_opening_one_fresh_database_at_once_all_succeed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    context = multiprocessing.get_context("fork")  # the parent has MLflow imported already
    queue = context.Queue()
    procs = [context.Process(target=_open_tracker, args=(str(tmp_path), queue)) for _ in range(4)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert results == [("ok", results[0][1])] * 4, results


def test_artifacts_live_beside_the_database_of_each_output_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    uris = []
    for name in ("a", "b"):
        tracker = Tracker(TrackingConfig(), tmp_path / name)
        run_id = tracker.start_parent(f"run-{name}", {}, {})
        tracker.log_artifact(run_id, note)
        uris.append(tracker.client.get_run(run_id).info.artifact_uri)
        tracker.end(run_id)
    for name, uri in zip(("a", "b"), uris):
        assert uri.startswith((tmp_path / name / "mlartifacts").as_uri()), (uri, (tmp_path / name / "mlartifacts").as_uri())
        assert (Path(uri.removeprefix("file://")) / "note.txt").read_text() == "hello"
    assert not (tmp_path / "mlruns").exists()


def test_runs_left_running_by_a_killed_process_are_closed_as_killed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = ("import sys, os; from pathlib import Path; from dgpt_core.config import TrackingConfig\n"
            "from flows.tracking import Tracker\n"
            "t = Tracker(TrackingConfig(), Path(sys.argv[1])); p = t.start_parent('killed', {}, {})\n"
            "t.start_child('pretrain'); print(p, flush=True); os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    parent = out.stdout.strip().splitlines()[-1]
    tracker = Tracker(TrackingConfig(), tmp_path)
    assert len(tracker.killed) == 2 and parent in tracker.killed
    live = tracker.start_parent("live", {}, {})
    statuses = {r.info.run_name: r.info.status for r in tracker.client.search_runs([tracker.experiment_id])}
    assert statuses == {"killed": "KILLED", "pretrain": "KILLED", "live": "RUNNING"}
    assert Tracker(TrackingConfig(), tmp_path).killed == []  # this process is alive: its run stays open
    tracker.end(live)


def _dgpt_run(out_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--preset", "ci", "--output-dir", str(out_dir),
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


CONCURRENT_EVAL = ["--set", "eval_models=[sft]", "--set", "eval.tasks=[ppl, repetition]"]
"""One cheap eval stage: the race is the same for every stage, the suite's tasks are tested elsewhere."""


def test_two_concurrent_runs_into_one_fresh_folder_both_finish_and_train_each_stage_once(tmp_path):
    procs = [_dgpt_run(tmp_path / "out", *CONCURRENT_EVAL) for _ in range(2)]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("ci-*/summary.json"))]
    assert len(summaries) == 2 and all(s["status"] == "completed" for s in summaries)
    for stage in ("data", "pretrain", "sft", "eval-sft"):
        assert sorted(s["cache_hit"][stage] for s in summaries) == [False, True], stage  # built once, reused once
    assert any("waiting for run" in log for log in logs)

    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("diffusiongpt").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.info.run_name for r in children) == sorted(summaries[0]["cache_hit"])
        assert {r.info.status for r in children} == {"FINISHED"}


def test_a_run_asked_not_to_wait_fails_in_one_line_naming_the_run_building_its_stage(tmp_path):
    """The data stage's folder is claimed (as a concurrent run would hold it): `--no-wait` exits 1
    at once with one line naming the holder, and the stage's MLflow child is not marked FAILED."""
    from dgpt_core.config import load_run_config
    from flows.caching import stage_key

    run = load_run_config("ci", [])
    key = stage_key("data", {"data": run.data.model_dump(mode="json"), "tokenizer": run.tokenizer.model_dump(mode="json"),
                             "max_seq_len": run.model.max_seq_len})
    with claim(tmp_path / "out" / "stages" / f"{key}.lock", "stage data", "the-other-run"):
        proc = _dgpt_run(tmp_path / "out", "--only", "data", "--no-wait")
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    last = out.strip().splitlines()
    errors = [line for line in last if line.startswith("dgpt run:")]
    assert errors == [next(line for line in last if line.startswith("dgpt run: stage data is being built by run "
                                                                    "'the-other-run' (pid "))], out[-3000:]
    assert "Traceback" not in out
    summary = json.loads(next((tmp_path / "out").glob("ci-*/summary.json")).read_text())
    assert summary["status"] == "failed" and summary["failed_stage"] is None
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    statuses = {r.info.run_name: r.info.status for r in client.search_runs(["1"])}
    assert statuses == {summary["run_name"]: "FAILED", "data": "KILLED"}
