"""How well the answer log-likelihood estimates of the RL stage track the exact value, on a trained
SFT model and the world's held-out questions (issue 30).

    python -m bench.rl_likelihood MODEL_DIR [--questions 66] [--candidates 8] [--out FILE.json]

For each held-out question (the eval's test set) the candidates are the gold answer and the same
attribute's values of other people (as the SFT rows end them: the value, <|im_end|>, then
<|endoftext|> up to the end of its block, or of the answer canvas for a full-canvas model). Each
candidate is scored exactly and by the closed-form ELBO (`exact_and_elbo`) and by d1's
`one_step_logp` (prompt unmasked),
and the script reports:
- the bias of each estimate on the gold answers (estimate - exact, nats per answer);
- the mean Spearman correlation between each estimate and the exact value over a question's
  candidates, and how often both put the same candidate first;
- how often the exact likelihood puts the gold answer first (likelihood-ranked exact match).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from dgpt_core.data.world import test_pairs
from dgpt_core.generation.options import trained_block_size
from dgpt_core.generation.sampler import TokenIds
from dgpt_core.rlhf.grpo import answer_target
from dgpt_core.rlhf.likelihood import answer_rows, exact_and_elbo, one_step_logp

from .common import encode_chat, load_subject

ESTIMATES = ("exact", "elbo", "one_step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.rl_likelihood", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("model", help="SFT model folder trained on the world")
    parser.add_argument("--questions", type=int, default=66, help="held-out questions (the first N)")
    parser.add_argument("--candidates", type=int, default=8, help="answers scored per question, the gold one included")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return parser.parse_args(argv)


@torch.no_grad()
def measure(model: Any, tokenizer: Any, world: Any, questions: int, candidates: int, canvas: int) -> dict[str, Any]:
    ids = TokenIds.from_tokenizer(tokenizer)
    block = trained_block_size(model)
    sets = test_pairs(world)
    pairs = sets["heldout"][:questions]
    values: dict[str, list[str]] = {}
    for pair in sets["heldout"] + sets["train"]:
        values.setdefault(pair.attribute, []).append(pair.answer)
    kw = {"mask_id": ids.mask, "pad_id": ids.pad, "block_size": block}
    bias: dict[str, list[float]] = {k: [] for k in ESTIMATES if k != "exact"}
    rho: dict[str, list[float]] = {k: [] for k in bias}
    same_first: dict[str, list[float]] = {k: [] for k in bias}
    gold_first: list[float] = []
    for n, pair in enumerate(pairs):
        others = sorted({v for v in values[pair.attribute] if v.strip() != pair.answer.strip()})
        chosen = [pair.answer] + others[: candidates - 1]
        prompt = encode_chat(tokenizer, [{"role": "user", "content": pair.question}])
        answers = [answer_target(tokenizer(" " + v.strip(), add_special_tokens=False)["input_ids"], True, ids,
                                 block or canvas) for v in chosen]
        rows = answer_rows([prompt] * len(answers), answers)
        exact, elbo = exact_and_elbo(model, rows, **kw)
        scores = {"exact": exact, "elbo": elbo,
                  "one_step": one_step_logp(model, rows, prompt_mask_prob=0.0,
                                            generator=torch.Generator().manual_seed(n), **kw)}
        gold_first.append(float(int(exact.argmax()) == 0))
        for key in bias:
            bias[key].append(float(scores[key][0] - exact[0]))
            rho[key].append(float(spearmanr(scores[key].numpy(), exact.numpy()).statistic))
            same_first[key].append(float(int(scores[key].argmax()) == int(exact.argmax())))
    return {"questions": len(pairs), "candidates": candidates, "block_size": block,
            "exact_ranks_gold_first": statistics.mean(gold_first),
            **{key: {"bias_on_gold_nats": statistics.mean(bias[key]),
                     "bias_on_gold_min_max": [min(bias[key]), max(bias[key])],
                     "spearman_with_exact": statistics.mean(rho[key]),
                     "same_first_as_exact": statistics.mean(same_first[key])} for key in bias}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    subject = load_subject(args.model, args.preset, Path("runs/bench-rl-likelihood"))
    if subject.world is None:
        raise SystemExit(f"bench.rl_likelihood: {args.model} was not trained on the world (data.sft.sources)")
    canvas = subject.run.data.sft.answer_canvas or 24
    figures = measure(subject.model, subject.tokenizer, subject.world, args.questions, args.candidates, canvas)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
