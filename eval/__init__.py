"""The eval suite: perplexity bounds, lm-eval tasks through our adapter, repetition metrics.

Public API:
    config:      EvalConfig
    suite:       run_eval(model_dir, out_dir, cfg) -> metrics dict (what the pipeline's eval stage calls)
    ppl:         ppl_bound, text_rows, answer_rows, summarize
    likelihood:  elbo_nll, mc_nll, greedy_matches, split_windows, Row
    lm_adapter:  DiffusionLM (lm-eval model "dgpt")
    benchmarks:  write_task_data, local_task_manager, run_tasks, flatten, check_standard_tasks
    repetition:  compare_strategies; metrics/repetition (an `evaluate` module loadable by path)
    report:      write_outputs, render_markdown
    cli:         add_eval_parser (`dgpt eval`)
"""

from __future__ import annotations

from dgpt_core.eval_config import EvalConfig

__all__ = ["EvalConfig", "run_eval"]


def __getattr__(name: str):  # lazy: the config must import without torch/lm-eval
    if name == "run_eval":
        from .suite import run_eval

        return run_eval
    raise AttributeError(name)
