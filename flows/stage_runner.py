"""The flow's stage runner: each cached stage task runs under a claim on its stage folder, with its
wall time, cache hit, outcome and MLflow child run recorded."""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

from prefect.filesystems import LocalFileSystem

from dgpt_core.cli_errors import DgptError
from tasks.stage_folders import is_complete

from .stage_lock import claim
from .tracking import Tracker


class StageFailedError(DgptError):
    """A stage of the flow raised; the message (the `dgpt run` error line) names the stage and the cause."""

    def __init__(self, stage: str, cause: BaseException, summary_path: Path):
        super().__init__(f"stage {stage} failed: {type(cause).__name__}: {cause} (summary: {summary_path})")
        self.stage = stage


class StageRunner:
    """Runs cached stage tasks, each under a claim on its stage folder (a concurrent run that needs
    the same folder waits for it, then hits the cache), and records per-stage wall time, cache
    hits, which stages completed or failed, and MLflow child runs."""

    def __init__(self, root: Path, forced: set[str], tracker: Tracker | None, run_name: str, wait: bool):
        basepath = str(root / ".prefect-results")
        self.storage = LocalFileSystem(basepath=basepath)
        # Prefect only takes result storage that is saved server-side; one block per output root
        self.storage.save(f"dgpt-results-{hashlib.sha256(basepath.encode()).hexdigest()[:12]}", overwrite=True)
        self.forced, self.tracker = forced, tracker
        self.run_name, self.wait = run_name, wait
        self.completed: set[str] = set()
        self.failed: str | None = None
        self.wall: dict[str, float] = {}
        self.cache_hits: dict[str, bool] = {}
        self.child_runs: dict[str, str] = {}

    def child(self, name: str) -> str | None:
        if self.tracker and name not in self.child_runs:
            self.child_runs[name] = self.tracker.start_child(name)
        return self.child_runs.get(name)

    def __call__(self, name: str, stage: str, task, /, **params: Any) -> dict[str, Any]:
        print(f"\n===== {name} =====")
        start = time.perf_counter()
        configured = task.with_options(result_storage=self.storage, refresh_cache=stage in self.forced)
        child = self.child(name)
        # training processes sample system metrics themselves (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING)
        sampling = self.tracker and "tracking_env" not in params
        with claim(Path(f"{params['out_dir']}.lock"), f"stage {name}", self.run_name, self.wait):
            try:
                with self.tracker.system_metrics(child) if sampling else contextlib.nullcontext():
                    state = configured(**params, return_state=True)
                result = state.result()
                hit = state.name == "Cached"
                if hit and not is_complete(params["out_dir"]):
                    print(f"{name}: the cached stage folder is incomplete, recomputing")
                    state = task.with_options(result_storage=self.storage, refresh_cache=True)(**params, return_state=True)
                    result, hit = state.result(), False
            except BaseException:
                self.failed = name
                raise
        self.completed.add(name)
        self.wall[name] = round(time.perf_counter() - start, 2)
        self.cache_hits[name] = hit
        print(f"{name}: {'cache hit' if hit else 'done'} in {self.wall[name]:.1f}s")
        return result

    def child_status(self, name: str) -> str:
        """MLflow status of a stage's child run: only the stage that raised is FAILED; one that
        started but never finished (the flow stopped elsewhere) is KILLED."""
        return "FAILED" if name == self.failed else "FINISHED" if name in self.completed else "KILLED"
