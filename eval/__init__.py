"""The eval suite: perplexity bounds, lm-eval tasks through our adapter, strategy comparison, editing.

Its settings are `dgpt_core.config.evaluation.EvalConfig` (in the library, so configs load without torch
or lm-eval) and the ELBO estimator is `dgpt_core.diffusion.elbo`. This package exports nothing itself;
import its modules:

    suite:                run_eval(model_dir, out_dir, cfg) -> metrics dict (the pipeline's eval stage)
    ppl:                  ppl_bound, text_rows, answer_rows, summarize
    likelihood:           mc_nll, greedy_matches, split_windows, windows_to_rows
    lm_adapter:           DiffusionLM (lm-eval model "dgpt")
    benchmarks:           write_task_data, local_task_manager, run_tasks, flatten, check_standard_tasks
    data:                 held-out data and prompts (from the model folder's run_config.yaml)
    strategy_comparison:  compare_strategies
    editing:              editing_metrics, corrupt_example
    storage:              cloze_accuracy (facts a pretrained model stores, on the synthetic world)
    world:                the synthetic world in the suite (storage, dgpt_world rows, long-generation prompts)
    answers:              per-question results as DataFrames (answers.parquet, answers/<group>.parquet)
    report:               write_outputs, render_markdown
    cli:                  add_eval_parser (`dgpt eval`)
    lm_eval_tasks/:       the local lm-eval tasks (YAML + utils.py)
    metrics/repetition/:  repetition metrics (an `evaluate` module loadable by path)
"""
