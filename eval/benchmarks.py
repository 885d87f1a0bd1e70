"""Run lm-eval tasks through our adapter: the local offline tasks, and standard tasks by name.

Local tasks live in eval/lm_eval_tasks (YAML + utils.py) and read JSONL files written at eval time
(`write_task_data`); their paths reach the tasks as TaskManager metadata. Standard tasks
(hellaswag, arc_easy, piqa, lambada, gsm8k, ...) go through the same adapter with lm-eval's own
task index; without the Hub they fail within seconds, naming the task (`check_standard_tasks`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dgpt_core.hub import hub_reachable, require_hub

from .data import write_jsonl

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
SKILLS_GROUP = "dgpt_skills"
CHITCHAT_TASK = "dgpt_chitchat_mc"
TEXT_TASK = "dgpt_heldout_text"
WORLD_GROUP = "dgpt_world"
TASK_FILES = {"skills_path": "skills.jsonl", "chitchat_path": "chitchat_mc.jsonl", "text_path": "heldout_text.jsonl",
              "world_path": "world.jsonl"}
_SKIP_KEYS = {"alias", "name", "sample_len", "sample_count", " "}


def task_skills() -> list[str]:
    """Skills that have a dgpt_skills_<skill> task YAML."""
    return sorted(p.stem.removeprefix(SKILLS_GROUP + "_") for p in TASK_DIR.glob(f"{SKILLS_GROUP}_*.yaml"))


def skills_tasks(present: Sequence[str]) -> list[str]:
    """The group when the data holds every skill of the group, else the per-skill tasks present."""
    known = task_skills()
    missing = sorted(set(present) - set(known))
    if missing:
        log.warning("skills without a task YAML are not scored: %s", missing)
    if set(known) <= set(present):
        return [SKILLS_GROUP]
    return [f"{SKILLS_GROUP}_{s}" for s in known if s in set(present)]


def write_task_data(
    folder: str | Path,
    *,
    skills: Sequence[dict] | None = None,
    chitchat: Sequence[dict] | None = None,
    texts: Sequence[str] | None = None,
    world: Sequence[dict] | None = None,
) -> dict[str, str]:
    """Write the local tasks' JSONL files; returns the TaskManager metadata pointing at them."""
    folder = Path(folder)
    meta: dict[str, str] = {}
    if skills is not None:
        meta["skills_path"] = str(write_jsonl(skills, folder / TASK_FILES["skills_path"]).resolve())
    if chitchat is not None:
        meta["chitchat_path"] = str(write_jsonl(chitchat, folder / TASK_FILES["chitchat_path"]).resolve())
    if texts is not None:
        rows = [{"text": t} for t in texts]
        meta["text_path"] = str(write_jsonl(rows, folder / TASK_FILES["text_path"]).resolve())
    if world is not None:
        meta["world_path"] = str(write_jsonl(world, folder / TASK_FILES["world_path"]).resolve())
    return meta


class _DropCustomKwargsHint(logging.Filter):
    """lm-eval warns on every task with a custom_dataset that kwargs can go through --metadata:
    that is how ours get their data paths, so the hint is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


_HINT_FILTER = _DropCustomKwargsHint()


def local_task_manager(metadata: dict[str, Any]):
    """A TaskManager over eval/lm_eval_tasks only (offline), with the data paths as metadata."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=dict(metadata))


def flatten(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's results -> {task: {metric: value}} (filter suffix dropped, N/A stderr dropped)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            name = key.split(",")[0]
            if name in _SKIP_KEYS or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            row[name] = float(value)
        for key in ("sample_len",):
            if isinstance(metrics.get(key), int):
                row["n"] = float(metrics[key])
        out[task] = row
    for task, n in results.get("n-samples", {}).items():
        if task in out and isinstance(n, dict) and "effective" in n:
            out[task]["n"] = float(n["effective"])
    return out


def run_tasks(
    lm: Any,
    tasks: Sequence[str],
    task_manager: Any,
    *,
    limit: int | None = None,
    seed: int = 0,
    apply_chat_template: bool = False,
) -> dict[str, Any]:
    """lm_eval.simple_evaluate with our adapter instance; the raw lm-eval results dict, with every
    document's request, answer and scores under "samples" (`eval.answers.sample_rows`)."""
    import lm_eval

    task_log = logging.getLogger("lm_eval.api.task")
    if _HINT_FILTER not in task_log.filters:
        task_log.addFilter(_HINT_FILTER)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=task_manager,
        limit=limit,
        log_samples=True,
        bootstrap_iters=100,
        apply_chat_template=apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # non-zero rank
        return {}
    return results


def skills_summary(flat: dict[str, dict[str, float]]) -> dict[str, float]:
    """{exact_match (overall, weighted by items), exact_match_<skill>, n_<skill>, n}."""
    row: dict[str, float] = {}
    hits = total = 0.0
    for task, metrics in sorted(flat.items()):
        if not task.startswith(SKILLS_GROUP + "_") or "exact_match" not in metrics:
            continue
        skill = task.removeprefix(SKILLS_GROUP + "_")
        n = metrics.get("n", 0.0)
        row[f"exact_match_{skill}"] = metrics["exact_match"]
        row[f"n_{skill}"] = n
        hits += metrics["exact_match"] * n
        total += n
    row["exact_match"] = flat.get(SKILLS_GROUP, {}).get("exact_match", hits / total if total else 0.0)
    row["n"] = total
    return row


def check_standard_tasks(names: Sequence[str]) -> None:
    """Fail within seconds, naming the task, when standard lm-eval tasks need the unreachable Hub."""
    for name in names:
        try:
            require_hub("lm-eval task dataset", name)
        except RuntimeError as err:
            raise RuntimeError(
                f"lm-eval task '{name}' downloads its dataset from the Hugging Face Hub, which is not "
                f"reachable (or HF_HUB_OFFLINE is set). Offline, run the local tasks instead "
                f"(ppl, dgpt_skills, dgpt_chitchat_mc, repetition). [{err}]"
            ) from None


def standard_task_manager():
    """lm-eval's full task index (only built when the Hub is reachable)."""
    from lm_eval.tasks import TaskManager

    if not hub_reachable():
        raise RuntimeError("standard lm-eval tasks need the Hugging Face Hub")
    return TaskManager()


def output_types(results: dict[str, Any]) -> dict[str, str]:
    """Task -> output_type, from lm-eval's results configs."""
    return {task: cfg.get("output_type", "") for task, cfg in results.get("configs", {}).items()}
