"""MLflow tracking of a flow run: one parent run per flow run, one child run per stage.

Training subprocesses (deepspeed / torchrun) cannot see the parent's active run, so each stage
gets its run id and the tracking URI through `stage_env`, which the HF MLflowCallback honours.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import psutil
from filelock import FileLock
from mlflow.tracking import MlflowClient

from dgpt_core.config import TrackingConfig

OWNER_HOST, OWNER_PID = "dgpt.host", "dgpt.pid"
"""Tags naming the flow process that owns a run, so a later run can close what a killed one left RUNNING."""
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000


def tracking_uri(cfg: TrackingConfig, output_root: Path) -> str:
    """MLFLOW_TRACKING_URI, else the config's URI, else a SQLite file in the output root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or f"sqlite:///{output_root.resolve()}/mlflow.db"


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists are kept as one JSON-ish string value."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(tree)[:MAX_PARAM_LENGTH]}


def sqlite_database(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI, else None (a server or a file store)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: `mlartifacts/` beside a SQLite database, not
    MLflow's default `./mlruns` of whatever directory the command ran in; a server or a file store
    decides for itself (None)."""
    database = sqlite_database(uri)
    return (database.resolve().parent / "mlartifacts").as_uri() if database else None


class Tracker:
    """Thin wrapper over MlflowClient for the parent/child run layout."""

    def __init__(self, cfg: TrackingConfig, output_root: Path):
        self.cfg = cfg
        self.uri = tracking_uri(cfg, output_root)
        database = sqlite_database(self.uri)
        # MLflow creates and migrates a new SQLite database when a client first opens it, which two
        # processes must not do at once; the lock also makes get-or-create of the experiment atomic
        with FileLock(f"{database}.lock") if database else contextlib.nullcontext():
            self.client = MlflowClient(self.uri)
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                cfg.experiment, artifact_location=artifact_location(self.uri))
        self.parent_id: str | None = None
        self.owner = {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid())}
        self.killed = self.close_orphaned_runs()

    def close_orphaned_runs(self) -> list[str]:
        """Mark KILLED the runs left RUNNING by a flow process of this host that no longer exists
        (killed, e.g. by `kill -9`, before it could end them); returns their ids."""
        running = self.client.search_runs(
            [self.experiment_id], f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST}` = '{self.owner[OWNER_HOST]}'",
            max_results=1000)
        orphans = [r.info.run_id for r in running if not psutil.pid_exists(int(r.data.tags.get(OWNER_PID, "0")))]
        for run_id in orphans:
            self.client.set_terminated(run_id, "KILLED")
        return orphans

    def start_parent(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={**tags, **self.owner})
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_child(self, stage: str, tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=stage,
            tags={"mlflow.parentRunId": self.parent_id or "", "stage": stage, **self.owner, **(tags or {})},
        )
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        flat = flatten(params)
        items = [mlflow.entities.Param(k, v) for k, v in sorted(flat.items())]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        flat = {k: float(v) for k, v in flatten_metrics(metrics).items()}
        entities = [mlflow.entities.Metric(k, v, int(mlflow.utils.time.get_current_time_millis()), step or 0)
                    for k, v in sorted(flat.items())]
        for start in range(0, len(entities), 500):
            self.client.log_batch(run_id, metrics=entities[start:start + 500])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_tables(self, run_id: str, tables: dict[str, Any], artifact_dir: str = "answers") -> None:
        """Each DataFrame of `tables` as an MLflow table `<artifact_dir>/<name>.json` of `run_id`: the
        UI shows it in the run's artifacts and sets the same table of several runs side by side in
        the experiment's evaluation view."""
        for name, frame in tables.items():
            self.client.log_table(run_id, frame, f"{artifact_dir}/{name}.json")

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """Terminate `run_id` as FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status)

    @contextlib.contextmanager
    def fluent_api(self) -> Iterator[None]:
        """MLflow's fluent API (start_run, register_model) on this tracker's URI while the block
        runs. `mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI, which `tracking_uri` reads
        first, so it is restored after: a later tracker of another output root must not inherit it."""
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)

    def stage_env(self, run_id: str) -> dict[str, str]:
        """Environment for a training process to log into `run_id` (HF MLflowCallback reads it)."""
        env = {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_RUN_ID": run_id, "MLFLOW_EXPERIMENT_ID": self.experiment_id}
        if self.cfg.system_metrics:
            env["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "true"
            env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = str(self.cfg.system_metrics_interval)
        return env

    @contextlib.contextmanager
    def system_metrics(self, run_id: str) -> Iterator[None]:
        """CPU/GPU/memory sampled into `run_id` while the block runs (MLflow system metrics)."""
        if not self.cfg.system_metrics:
            yield
            return
        mlflow.set_system_metrics_sampling_interval(self.cfg.system_metrics_interval)
        with self.fluent_api(), mlflow.start_run(run_id=run_id, log_system_metrics=True):
            yield

    def log_text_diffusion_model(self, run_id: str, model_dir: Path, alias: str | None = None) -> tuple[str, str]:
        """Log the saved folder as a pyfunc model in `run_id`, register it, point `alias` (default
        the config's model_alias) at it. Returns (registered model name, version)."""
        from .mlflow_model import log_pyfunc_model

        with self.fluent_api():
            with mlflow.start_run(run_id=run_id):
                info = log_pyfunc_model(model_dir)
            version = mlflow.register_model(info.model_uri, self.cfg.registered_model_name)
        self.client.set_registered_model_alias(self.cfg.registered_model_name, alias or self.cfg.model_alias,
                                               version.version)
        return self.cfg.registered_model_name, str(version.version)


def flatten_metrics(tree: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as 'a/b/c' metric names (MLflow's grouping separator);
    characters MLflow refuses in a name become underscores (spaces) or colons (the `+` of decoding
    method names: `confidence+guard` -> `confidence:guard`)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten_metrics(value, f"{prefix}{key}/"))
    elif isinstance(tree, bool):
        out[prefix[:-1]] = float(tree)
    elif isinstance(tree, int | float) and tree == tree:  # drops NaN
        out[prefix[:-1]] = float(tree)
    return {k.replace(" ", "_").replace("+", ":"): v for k, v in out.items()}
