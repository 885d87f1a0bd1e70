"""lm-eval through the served API against lm-eval through the in-process adapter, same task.

    python -m bench.serve_lm_eval MODEL_DIR [--task dgpt_world_train] [--limit 40] [--url URL]

Builds the synthetic-world task data of the model folder's run config, then scores the task
twice with the same limit: lm-eval's `local-chat-completions` model against `dgpt serve` (started
here unless --url), and our `DiffusionLM` adapter in this process. The served model gets each
question as a user message (lm-eval's --apply_chat_template) and the server applies the model's
chat template; the adapter gets the same question already rendered with that template, so both
decode the same prompt tokens on the same canvas (the task's max_gen_toks) with the folder's
sampler defaults. They draw from different seeds (lm-eval sends seed 1234 per request; the adapter
uses the eval seed per batch), so sampled answers may differ a little.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deploy.serve.process import started_server
from dgpt_core.cli_errors import UsageError
from dgpt_core.config import read_folder_run_config
from dgpt_core.models.tokenizer import load_tokenizer
from eval.benchmarks import flatten, local_task_manager, run_tasks, write_task_data
from eval.lm_adapter import DiffusionLM
from eval.world import TASKS, task_rows, world_config


def world_rows(model_dir: str | Path, seed: int) -> tuple[list[dict], list[dict]]:
    """The dgpt_world records for the adapter (context: the rendered chat prompt) and for the
    served model (context: the bare question, which lm-eval sends as the user message)."""
    run = read_folder_run_config(model_dir)
    cfg = None if run is None else world_config(run.data)
    if cfg is None:
        raise UsageError(f"{model_dir} has no run config with a synthetic-world source: no dgpt_world data to build")
    rows = task_rows(cfg, load_tokenizer(str(model_dir)), "sft", seed)
    return rows, [{**row, "context": row["prompt"]} for row in rows]


def score(results: dict[str, Any], task: str) -> float:
    return flatten(results)[task]["exact_match"]


def served_score(url: str, model_id: str, task: str, meta: dict[str, str], limit: int, seed: int,
                 concurrent: int) -> float:
    from lm_eval.models.openai_completions import LocalChatCompletion

    lm = LocalChatCompletion(model=model_id, base_url=url + "/v1/chat/completions", tokenizer_backend=None,
                             tokenized_requests=False, num_concurrent=concurrent, max_retries=1)
    return score(run_tasks(lm, [task], local_task_manager(meta), limit=limit, seed=seed,
                           apply_chat_template=True), task)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="an SFT model folder trained on the synthetic world")
    parser.add_argument("--task", default=TASKS["train"], choices=[t for s, t in TASKS.items() if s != "bio"])
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--url", default=None, help="a running `dgpt serve` of MODEL_DIR (default: start one)")
    parser.add_argument("--concurrent", type=int, default=8, help="lm-eval's num_concurrent for the served model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    adapter_rows, served_rows = world_rows(args.model_dir, args.seed)
    model_id = Path(args.model_dir).absolute().name
    out: dict[str, Any] = {"task": args.task, "limit": args.limit, "model": str(args.model_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        served_meta = write_task_data(Path(tmp) / "served", world=served_rows)
        adapter_meta = write_task_data(Path(tmp) / "adapter", world=adapter_rows)
        start = time.perf_counter()
        if args.url:
            out["served"] = served_score(args.url, model_id, args.task, served_meta, args.limit, args.seed,
                                         args.concurrent)
        else:
            with started_server(args.model_dir) as url:
                out["served"] = served_score(url, model_id, args.task, served_meta, args.limit, args.seed,
                                             args.concurrent)
        out["served_seconds"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        lm = DiffusionLM(pretrained=str(args.model_dir), seed=args.seed)
        out["in_process"] = score(run_tasks(lm, [args.task], local_task_manager(adapter_meta), limit=args.limit,
                                            seed=args.seed), args.task)
        out["in_process_seconds"] = round(time.perf_counter() - start, 1)
    print(f"{args.task}, limit {args.limit}: exact match served (local-chat-completions) {out['served']:.3f} "
          f"in {out['served_seconds']}s; in-process (DiffusionLM) {out['in_process']:.3f} "
          f"in {out['in_process_seconds']}s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
