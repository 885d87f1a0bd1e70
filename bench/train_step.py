"""Training-step time split on a preset's model: collator vs forward+backward+optimizer.

    python -m bench.train_step --preset tiny --stage sft --steps 20 [--data DIR]

Uses the preset's prepared data when it exists (`dgpt prepare`), else prepares it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dgpt_core.config import load_run_config
from dgpt_core.data.stages import prepare_all
from dgpt_core.diffusion.collator import DiffusionCollator
from dgpt_core.diffusion.loss import diffusion_loss
from dgpt_core.models.backbone import build_model
from dgpt_core.models.tokenizer import load_tokenizer, special_token_ids
from dgpt_core.training.stage import load_stage_datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--stage", default="sft", choices=("pretrain", "sft"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", default=None, help="data root (default: <output_dir>/<preset>/data)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    run = load_run_config(args.preset, args.overrides)
    root = Path(args.data or Path(run.output_dir) / run.preset / "data")
    folders = prepare_all(run.data, run.tokenizer, run.model.max_seq_len, root)
    tok = load_tokenizer(folders["tokenizer"])
    cfg = getattr(run, args.stage)
    train = load_stage_datasets(folders[args.stage])["train"].shuffle(seed=0)
    collator = DiffusionCollator.from_tokenizer(cfg.diffusion, tok, run.model.max_seq_len)
    collator.set_progress(1.0)  # edit stage on: the most expensive corruption
    torch.manual_seed(0)
    model = build_model(run.model, tok).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    mask_id = special_token_ids(tok)["mask"]
    bs = cfg.per_device_batch_size
    collate_ms, step_ms, tokens = [], [], []
    for step in range(args.steps + 2):
        features = [train[i] for i in range(step * bs, (step + 1) * bs)]
        t0 = time.perf_counter()
        batch = collator(features)
        t1 = time.perf_counter()
        loss = diffusion_loss(model, batch, mask_id=mask_id, normalization=cfg.diffusion.loss_normalization).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step >= 2:  # warm-up steps excluded
            collate_ms.append(1000 * (t1 - t0))
            step_ms.append(1000 * (t2 - t1))
            tokens.append(int(batch["attention_mask"].sum()))
    result = {
        "preset": run.preset, "stage": args.stage, "batch": bs, "threads": torch.get_num_threads(),
        "collator_ms": round(statistics.median(collate_ms), 3),
        "forward_backward_optimizer_ms": round(statistics.median(step_ms), 2),
        "collator_share": round(statistics.median(collate_ms) / (statistics.median(collate_ms) + statistics.median(step_ms)), 4),
        "tokens_per_step": round(statistics.mean(tokens), 1),
        "tokens_per_second": round(sum(tokens) / (sum(step_ms) + sum(collate_ms)) * 1000, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
