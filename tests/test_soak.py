"""A bounded soak (slow suite): ci-sized `dgpt run`s into one output root in a loop, with random
stage refreshes and, in half of them, a `kill -9` of the whole process group at a random moment.
After every kill each marked stage folder is complete, and a plain rerun (no refresh: a stage the
killed run was rebuilding comes back from the cache unmarked and is recomputed) succeeds; at the end
every stage folder is complete, the MLflow database passes SQLite's integrity check and no run
is left RUNNING.

    DGPT_SOAK_RUNS=20 DGPT_SOAK_SEED=15 scripts/test.sh -m slow tests/test_soak.py -s
"""

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from flows.plan import FLOW_STAGES
from tasks.stage_folders import STAGE_MARKER, is_complete

ROOT = Path(__file__).resolve().parents[1]
KILL_WINDOW_S = (10.0, 40.0)  # python and Prefect start in ~10 s; a run mostly from the cache takes ~25 s


def _dgpt_run(root: Path, log: Path, args: list[str], kill_after: float | None) -> tuple[int | None, str]:
    """One `dgpt run --preset ci`; with `kill_after`, SIGKILL its process group then (None if it
    finished first). Returns (exit code or None when killed, log text)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--preset", "ci", "--output-dir", str(root),
                                 *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=kill_after if kill_after is not None else 900)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                raise
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, log.read_text(errors="replace")


def _stage_folders(root: Path) -> list[Path]:
    return sorted(p for p in (root / "stages").iterdir() if p.is_dir()) if (root / "stages").exists() else []


@pytest.mark.slow
def test_soak_of_killed_and_refreshed_runs_leaves_complete_stage_folders_and_a_sound_database(tmp_path):
    runs = int(os.environ.get("DGPT_SOAK_RUNS", "20"))
    rng = random.Random(int(os.environ.get("DGPT_SOAK_SEED", "15")))
    killed_runs = set(rng.sample(range(runs), runs // 2))
    root, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    counts: Counter[str] = Counter()
    started = time.perf_counter()
    for index in range(runs):
        refresh = sorted(rng.sample(FLOW_STAGES, rng.choice([0, 0, 1, 2])))
        args = ["--refresh", *refresh] if refresh else []
        counts["refreshed_stages"] += len(refresh)
        kill_after = rng.uniform(*KILL_WINDOW_S) if index in killed_runs else None
        code, log = _dgpt_run(root, logs / f"run-{index}.log", ["--run-name", f"soak-{index}", *args], kill_after)
        if code is None:
            counts["killed"] += 1
            stage = (re.findall(r"===== (\S+) =====", log) or ["startup"])[-1]
            counts[f"killed_in:{stage}"] += 1
            for folder in _stage_folders(root):
                marked = (folder / STAGE_MARKER).exists()
                assert not marked or is_complete(folder), f"run {index}: {folder.name} is marked but incomplete"
                counts["unmarked_after_kill"] += not marked
            code, log = _dgpt_run(root, logs / f"run-{index}-again.log", ["--run-name", f"soak-{index}-again"], None)
            counts["reruns"] += 1
            counts["resumed_training"] += len(re.findall(r"resuming \w+ from", log))
        else:
            counts["finished_before_kill" if kill_after is not None else "uninterrupted"] += 1
        assert code == 0, f"run {index} ({args}) exited {code}:\n{log[-3000:]}"
        counts["cache_hits"] += log.count(": cache hit in")
        counts["recomputed_incomplete"] += log.count("cached stage folder is incomplete")

    folders = _stage_folders(root)
    assert folders and all(is_complete(folder) for folder in folders), [f.name for f in folders if not is_complete(f)]
    with sqlite3.connect(root / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        statuses = Counter(dict(db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()))
    assert statuses["RUNNING"] == 0 and statuses["FAILED"] == 0, statuses
    figures = {"runs": runs, **counts, "stage_folders": len(folders), "mlflow_runs": dict(statuses),
               "wall_s": round(time.perf_counter() - started)}
    (tmp_path / "soak.json").write_text(json.dumps(figures, indent=2))
    print("soak:", json.dumps(figures, sort_keys=True))
