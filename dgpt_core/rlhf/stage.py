"""The RL stage as a plain function: an SFT model folder in, the GRPO-trained model folder out
(`train_rl_stage`), and the entry point of its launched processes (`main`).

The policy and the frozen reference both start from the SFT folder; the saved folder keeps the
SFT folder's model info and sampler defaults, so it decodes exactly as the SFT model does.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from transformers import ModernBertForMaskedLM, TrainerCallback, set_seed
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ..config import FOLDER_CONFIG_NAME, RunConfig
from ..generation.options import SamplerConfig, TokenIds
from ..generation.schedules import get_schedule
from ..models.adapters import attach_adapter, load_merged_model, save_adapted_folder
from ..models.backbone import count_parameters
from ..models.export import save_model_folder
from ..models.info import model_info_of, read_sampler_defaults
from ..models.tokenizer import load_tokenizer
from ..training.memory import PeakMemory
from ..training.stage import StageResult, single_process_env
from ..training.trainer import remove_checkpoints, resumable_checkpoint, training_arguments
from .tasks import kinds_of, reward, task_items
from .trainer import GRPOTrainer, index_collator

log = logging.getLogger(__name__)


def train_rl_stage(
    run: RunConfig,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    init_model_dir: str | Path,
    *,
    resume: bool = False,
    report_to: str | list[str] = "none",
    callbacks: list[TrainerCallback] | None = None,
    show_progress: bool = True,
) -> StageResult:
    """GRPO of the SFT model in `init_model_dir` on `run.rl`'s task; the model goes to
    out_dir/model, checkpoints to out_dir/checkpoints (`resume` continues from the last complete
    one short of max_steps, else the stage starts clean)."""
    cfg = run.rl
    out_dir = Path(out_dir)
    if cfg.deepspeed and "RANK" not in os.environ:
        os.environ.update(single_process_env())
    tokenizer = load_tokenizer(tokenizer_dir)
    items = task_items(cfg, run.data, tokenizer)
    # the reference is loaded before the TrainingArguments: under ZeRO-3 it stays whole (not partitioned)
    reference = load_merged_model(init_model_dir)
    checkpoint_dir = out_dir / "checkpoints"
    args = training_arguments(cfg, checkpoint_dir, report_to=report_to, disable_tqdm=not show_progress,
                              eval_strategy="no", include_num_input_tokens_seen="no")
    checkpoint = resumable_checkpoint(checkpoint_dir, cfg.max_steps) if resume else None
    if checkpoint is not None:
        log.info("resuming rl from %s", checkpoint)
    else:
        with args.main_process_first(local=False):
            if args.should_save and (stale := remove_checkpoints(checkpoint_dir)):
                log.info("rl starts from scratch: removed %s", [p.name for p in stale])
    set_seed(cfg.seed)
    model = load_merged_model(init_model_dir)
    adapting = cfg.adapter.enabled
    if adapting:
        model = attach_adapter(model, cfg.adapter)
    info = model_info_of(reference)
    token_ids = TokenIds.from_tokenizer(tokenizer)
    log.info("rl: %d prompts (%s), %d answers per prompt", len(items), ", ".join(kinds_of(items)), cfg.group_size)
    trainer = GRPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"index": list(range(len(items)))}),
        data_collator=index_collator,
        callbacks=callbacks or [],
        reference=reference,
        prompts=[item.prompt_ids for item in items],
        reward=lambda i, answer: reward(items[i], tokenizer.decode(answer, skip_special_tokens=True)),
        kinds=[item.kind for item in items],
        rl_config=cfg,
        token_ids=token_ids,
        sampler=SamplerConfig.of_model(reference),
        schedule=get_schedule(info.schedule, info.t_eps) if info else get_schedule("linear"),
    )
    with PeakMemory() as memory:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics: dict[str, Any] = {**output.metrics, **memory.metrics()}
    metrics.update(parameters=count_parameters(model), trainable_parameters=count_parameters(model, trainable_only=True),
                   steps=trainer.state.global_step, prompts=len(items),
                   world_size=trainer.args.world_size)
    # the answers' trained tokens (end-of-text padding of their last block included), per second
    metrics["tokens_per_second"] = round(trainer.session_answer_tokens / max(output.metrics["train_runtime"], 1e-9), 1)
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    if rewards:
        metrics.update(reward_first=rewards[0], reward_last=rewards[-1])

    model_dir = out_dir / "model"
    if trainer.is_deepspeed_enabled and trainer.model_wrapped.zero_optimization_stage() == 3:
        trainer.save_model(str(model_dir))  # every rank: gathers the ZeRO-3 shards into full weights
        unset_hf_deepspeed_config()
        if trainer.is_world_process_zero():
            model = ModernBertForMaskedLM.from_pretrained(model_dir)
    if trainer.is_world_process_zero():
        if adapting:
            save_adapted_folder(model, tokenizer, model_dir, init_model_dir, cfg.adapter.save,
                                sampler_defaults=read_sampler_defaults(init_model_dir), info=info)
        else:
            save_model_folder(model, tokenizer, model_dir, sampler_defaults=read_sampler_defaults(init_model_dir),
                              info=info)
        run.save_yaml(model_dir / FOLDER_CONFIG_NAME)
        (model_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return StageResult(model_dir=model_dir, metrics=metrics)


@record
def main(argv: list[str] | None = None) -> int:
    """Entry point of one RL training process, for `deepspeed` / `torchrun` launches:

    torchrun --nproc_per_node 2 -m dgpt_core.rlhf.stage --run-config run_config.yaml --tokenizer-dir T \\
        --out-dir O --init-model-dir SFT_MODEL [--resume]
    """
    import argparse

    from ..training.stage import join_process_group

    parser = argparse.ArgumentParser(prog="python -m dgpt_core.rlhf.stage", description=main.__doc__)
    parser.add_argument("--run-config", required=True, help="resolved RunConfig YAML")
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--init-model-dir", required=True, help="the SFT model folder")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--report-to", default="none", help="transformers report_to (e.g. mlflow)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run = RunConfig.from_yaml(args.run_config)
    restart = join_process_group(run.rl, "rl")
    result = train_rl_stage(run, args.tokenizer_dir, args.out_dir, args.init_model_dir,
                            resume=args.resume or restart > 0, report_to=args.report_to)
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(args.out_dir) / "stage_result.json").write_text(
            json.dumps({"model_dir": str(result.model_dir), "metrics": result.metrics}, indent=2, default=float))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
