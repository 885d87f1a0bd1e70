"""Sampler benchmarks: per-step overhead, decoding methods on the test workload, time vs length.

The workload is the world's biography requests of held-out people when the run's SFT data is the
world (quality: fact recall, fact precision, exact match; canvas: the long-answer canvas; bench.world),
else the skills test items (quality: exact match; canvas: the run's eval skills canvas).
Decoding methods (argmax tokens, seed 0, the workload's canvas):
`ancestral` (MDLM, positions at random) at its best-quality step count is the reference;
`confidence`, `margin`, `entropy` (count-based top-k by p, p1 - p2, -H) and `confidence+guard`
(with the 5-gram repetition guard) at their best step counts; `threshold` (Fast-dLLM, tau 0.9,
`steps` = canvas as the cap), `eb` (EB-sampler, at its best entropy budget gamma, the same cap),
`threshold_block` (threshold in blocks of half the canvas) and `threshold_block_cache` (that with
the approximate prefix cache).
Every setting of the sweep is timed in the same alternating loop, so tokens/s ratios compare
runs made seconds apart. Tokens/s counts answer tokens (up to and including the stop token).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dgpt_core.data.skills import check_answer
from dgpt_core.generation import sampler as sampling
from dgpt_core.generation.options import trained_block_size
from dgpt_core.generation.sampler import SamplerConfig, TokenIds, generate
from eval.metrics.repetition.repetition import repetition_metrics

from .common import (
    BenchSizes,
    Subject,
    Workload,
    alternate,
    encode_chat,
    median_ratio,
    per_skill,
    random_model,
    random_tokens,
    synthetic_tokenizer,
)
from .world import bio_workload

QUALITY_TOLERANCE = 0.01
"""A fast method qualifies when each quality score of the workload (skills: exact match; world:
fact recall and fact precision) is at most this far below the reference's."""


@contextlib.contextmanager
def recorded_draws() -> Iterator[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]]:
    """Record (model input, attention mask, drawn block positions, context width) of every token
    draw the sampler makes (one per denoising step) into the yielded list."""
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
    original = sampling._Forward.__call__

    def record(self: Any, step: int, x: torch.Tensor, attn: torch.Tensor, live: torch.Tensor,
               positions: torch.Tensor, *rest: Any) -> Any:
        calls.append((x.clone(), attn.clone(), positions.clone(), self.width))
        return original(self, step, x, attn, live, positions, *rest)

    sampling._Forward.__call__ = record
    try:
        yield calls
    finally:
        sampling._Forward.__call__ = original


@torch.inference_mode()
def replay_forwards(model: torch.nn.Module, calls: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]) -> None:
    """The model work of recorded draws alone: the backbone on each new input, then the head and
    the vocabulary projection at the drawn positions, into one reused buffer (the cheapest way to
    get those logits: a fresh (positions, vocab) output costs page faults)."""
    rows = max(int(positions.sum()) for _, _, positions, _ in calls)
    buffer = torch.empty((rows, model.decoder.out_features))
    previous, block = None, None
    for x, attn, positions, width in calls:
        if previous is None or not torch.equal(previous, x):
            block = model.model(input_ids=x, attention_mask=attn).last_hidden_state[:, width:]
            previous = x
        hidden = model.head(block[positions])
        out = buffer[: hidden.shape[0]]
        if model.decoder.bias is None:
            torch.mm(hidden, model.decoder.weight.t(), out=out)
        else:
            torch.addmm(model.decoder.bias, hidden, model.decoder.weight.t(), out=out)


OVERHEAD_SETTINGS = {
    "random": {"strategy": "random"},
    "confidence": {"strategy": "confidence"},
    "threshold": {"strategy": "threshold"},
    "confidence_greedy": {"strategy": "confidence", "temperature": 0.0},
}
"""Sampler settings of the overhead measurement (sampled at temperature 1 unless greedy)."""


def overhead_share(subject: Subject, vocab_size: int, sizes: BenchSizes) -> dict[str, Any]:
    """Everything in the denoising steps except the model forward, over the forward: a whole
    sampler run's time minus the time of replaying just its model work (`replay_forwards`), over
    the latter, alternating the two, median over repetitions; per setting of OVERHEAD_SETTINGS
    (batch 8, prompt 16, canvas 64, 32 steps) on a random model of the run's shape."""
    tokenizer = synthetic_tokenizer(vocab_size)
    model = random_model(subject.run.model, tokenizer, max_seq_len=80).eval()
    ids = TokenIds.from_tokenizer(tokenizer)
    prompts = random_tokens(tokenizer, (8, 16))
    shares: dict[str, float] = {}
    for name, options in OVERHEAD_SETTINGS.items():
        cfg = SamplerConfig(steps=32, max_new_tokens=64, stop_token_ids=(), seed=0, **options)
        with recorded_draws() as calls:
            generate(model, prompts, ids, cfg)  # also the warm-up
        replay_forwards(model, calls)
        seconds = alternate({"sampler": functools.partial(generate, model, prompts, ids, cfg),
                             "forward": functools.partial(replay_forwards, model, calls)}, sizes.reps, warmup=False)
        shares[name] = statistics.median((s - f) / f for s, f in zip(seconds["sampler"], seconds["forward"]))
    return {"share": max(shares.values()), "by_strategy": shares}


@dataclass
class Outcome:
    """Quality and cost of one decoding setting over a workload's items."""

    scores: dict[str, float]
    """Mean of each score of the workload's scorer over the items that give it."""
    loop_rate: float
    rep_4: float
    """Share of repeated 4-grams (eval.metrics.repetition)."""
    nfe: float
    """Forward passes per sampler call (a batch of prompts)."""
    tokens: int
    """Answer tokens generated, stop tokens included."""


def skills_workload(subject: Subject, sizes: BenchSizes) -> Workload:
    """`sizes.skills_per_skill` skills test items per skill on the eval's skills canvas; quality =
    exact match (`check_answer`)."""
    items = per_skill(subject.skills, sizes.skills_per_skill)

    def scorer(index: int, text: str) -> dict[str, float]:
        return {"exact_match": float(check_answer(items[index], text))}

    return Workload("skills", [encode_chat(subject.tokenizer, item.prompt_messages) for item in items],
                    subject.run.eval.skills_canvas or 24, scorer, ("exact_match",))


def score(workload: Workload, answers: list[list[int]], stopped: list[bool], nfes: list[float],
          tokenizer: Any) -> Outcome:
    """Mean scores, loop rate, mean NFE per call and answer tokens of the decoded answers."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for index, answer in enumerate(answers):
        for key, value in workload.scorer(index, tokenizer.decode(answer, skip_special_tokens=True)).items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    text = repetition_metrics(answers)
    return Outcome(
        scores={key: sums[key] / counts[key] for key in sums},
        loop_rate=text["loop_rate"],
        rep_4=text["rep_4"],
        nfe=sum(nfes) / len(nfes),
        tokens=sum(len(a) + s for a, s in zip(answers, stopped)),
    )


Decoder = Callable[[list[list[int]]], tuple[list[list[int]], list[bool], float]]
"""A batch of prompts -> (answers, stopped, forward passes)."""


def diffusion_decoder(model: torch.nn.Module, ids: TokenIds, cfg: SamplerConfig) -> Decoder:
    def decode(prompts: list[list[int]]) -> tuple[list[list[int]], list[bool], float]:
        result = generate(model, prompts, ids, cfg)
        return result.answers, result.stopped, result.nfe

    return decode


def forwards_per_row(model: torch.nn.Module, ids: TokenIds, cfg: SamplerConfig, prompts: list[list[int]],
                     batch_size: int) -> float:
    """Mean number of forward passes each prompt takes part in (threshold decoding drops finished
    rows from the batch, so this is below the per-call NFE); counted by a logits hook, untimed."""
    row_forwards = 0

    def count(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        nonlocal row_forwards
        row_forwards += x.shape[0]
        return logits

    for start in range(0, len(prompts), batch_size):
        generate(model, prompts[start : start + batch_size], ids, cfg, logits_hook=count)
    return row_forwards / len(prompts)


def decode_items(workload: Workload, batch_size: int, decoder: Decoder, tokenizer: Any) -> Outcome:
    """Decode every prompt of the workload in batches and score the answers."""
    answers: list[list[int]] = []
    stopped: list[bool] = []
    nfes: list[float] = []
    for start in range(0, len(workload.prompts), batch_size):
        got, stop, nfe = decoder(workload.prompts[start : start + batch_size])
        answers += got
        stopped += stop
        nfes.append(nfe)
    return score(workload, answers, stopped, nfes, tokenizer)


STEP_METHODS = {"ancestral": "random", "confidence": "confidence", "margin": "margin", "entropy": "entropy",
                "confidence+guard": "confidence+guard"}
"""Methods swept over step counts (canvas / 4, / 2, / 1): method name -> decoding method of the sampler."""
EB_GAMMAS = (0.01, 0.1, 1.0)
"""Entropy budgets (nats per step) of the EB-sampler sweep."""


def method_settings(canvas: int, thresholds: Sequence[float], block: int | None = None) -> dict[str, tuple[str, SamplerConfig]]:
    """Sweep point name -> (method, sampler config); the semi-autoregressive points take blocks of
    `block` (a block-causal model's trained size, which it requires), else of half the canvas."""
    base = SamplerConfig(temperature=0.0, seed=0, max_new_tokens=canvas)
    grid = sorted({max(1, canvas // 4), max(1, canvas // 2), canvas})
    out: dict[str, tuple[str, SamplerConfig]] = {}
    for method, decoding in STEP_METHODS.items():
        for steps in grid:
            out[f"{method}@{steps}"] = (method, base.for_method(decoding).replace(steps=steps))
    for tau in thresholds:
        out[f"threshold@{tau}"] = ("threshold", base.replace(strategy="threshold", threshold=tau, steps=canvas))
    for gamma in EB_GAMMAS:
        out[f"eb@{gamma}"] = ("eb", base.replace(strategy="eb", eb_gamma=gamma, steps=canvas))
    block = block or max(1, canvas // 2)
    out["threshold_block@0.9"] = ("threshold_block", base.replace(strategy="threshold", block_size=block, steps=block))
    out["threshold_block_cache@0.9"] = ("threshold_block_cache",
                                        out["threshold_block@0.9"][1].replace(prefix_cache=True))
    return out


def methods_suite(subject: Subject, sizes: BenchSizes) -> dict[str, Any]:
    """sample.methods, the sweep, the reference, the best fast method and the speedups, on the
    world's biography requests when the run's SFT data is the world, else on the skills items."""
    workload = bio_workload(subject, sizes) if subject.world is not None else skills_workload(subject, sizes)
    prompts, canvas, keys = workload.prompts, workload.canvas, workload.quality_keys
    ids = TokenIds.from_tokenizer(subject.tokenizer)
    settings = {name: (method, workload.sampler(cfg))
                for name, (method, cfg) in method_settings(canvas, sizes.thresholds, trained_block_size(subject.model)).items()}
    outcomes: dict[str, Outcome] = {}

    def runner(name: str, cfg: SamplerConfig) -> Callable[[], None]:
        decoder = diffusion_decoder(subject.model, ids, cfg)

        def run() -> None:
            outcomes[name] = decode_items(workload, sizes.batch_size, decoder, subject.tokenizer)

        return run

    seconds = alternate({name: runner(name, cfg) for name, (_, cfg) in settings.items()}, sizes.reps)
    sweep = {
        name: {"method": method, "nfe": outcomes[name].nfe,
               "nfe_per_prompt": forwards_per_row(subject.model, ids, cfg, prompts, sizes.batch_size),
               **outcomes[name].scores,
               "loop_rate": outcomes[name].loop_rate,
               "rep_4": outcomes[name].rep_4,
               "tokens_per_s": outcomes[name].tokens / statistics.median(seconds[name])}
        for name, (method, cfg) in settings.items()
    }

    def quality(name: str) -> tuple[float, ...]:
        return tuple(sweep[name][k] for k in keys)

    def best_of(method: str) -> str:
        names = [n for n, (m, _) in settings.items() if m == method]
        return max(names, key=lambda n: (*quality(n), -sweep[n]["nfe"]))

    chosen = {**{method: best_of(method) for method in STEP_METHODS},
              "threshold": "threshold@0.9" if "threshold@0.9" in sweep else best_of("threshold"),
              "eb": best_of("eb"),
              "threshold_block": "threshold_block@0.9", "threshold_block_cache": "threshold_block_cache@0.9"}
    reference = sweep[chosen["ancestral"]]
    fast = [n for n, (m, _) in settings.items() if m != "ancestral"]
    qualified = [n for n in fast if all(sweep[n][k] >= reference[k] - QUALITY_TOLERANCE for k in keys)
                 and sweep[n]["loop_rate"] <= reference["loop_rate"]]
    best = max(qualified, key=lambda n: sweep[n]["tokens_per_s"]) if qualified else \
        max(fast, key=lambda n: (*quality(n), sweep[n]["tokens_per_s"]))
    tps = {n: [outcomes[n].tokens / s for s in seconds[n]] for n in (best, chosen["ancestral"])}
    return {
        "workload": workload.name,
        "quality_keys": list(keys),
        "methods": {method: {"setting": name, **sweep[name]} for method, name in chosen.items()},
        "sweep": sweep,
        "reference": chosen["ancestral"],
        "best_fast": best,
        "best_fast_within_quality": bool(qualified),
        "best_fast_config": dataclasses.asdict(settings[best][1]),
        "nfe_speedup": reference["nfe_per_prompt"] / sweep[best]["nfe_per_prompt"],
        "nfe_speedup_cap": reference["nfe_per_prompt"],  # over the minimum, one forward per prompt
        "nfe_per_call_speedup": reference["nfe"] / sweep[best]["nfe"],
        "tokens_per_s_speedup": median_ratio(tps[best], tps[chosen["ancestral"]]),
        "items": len(prompts),
        "canvas": canvas,
        "batch_size": sizes.batch_size,
    }


def length_suite(subject: Subject, sizes: BenchSizes) -> dict[str, Any]:
    """Sampler seconds per generation length, full canvas vs blocks of `length_block` without and
    with the prefix cache, all with threshold decoding capped at one step per 4 tokens (the same
    NFE), on a random model of the run's shape (a trained one knows no such lengths); batch 1,
    prompt 16."""
    lengths = list(sizes.lengths)
    model = random_model(subject.run.model, subject.tokenizer, max_seq_len=max(lengths) + 16).eval()
    ids = TokenIds.from_tokenizer(subject.tokenizer)
    prompt = random_tokens(subject.tokenizer, (1, 16))
    base = SamplerConfig(strategy="threshold", stop_token_ids=(), temperature=0.0, seed=0)
    block = sizes.length_block
    fns = {}
    for n in lengths:
        full_cfg = base.replace(max_new_tokens=n, steps=max(1, n // 4))
        block_cfg = base.replace(max_new_tokens=n, steps=max(1, block // 4), block_size=block)
        fns[f"full@{n}"] = functools.partial(generate, model, prompt, ids, full_cfg)
        fns[f"block@{n}"] = functools.partial(generate, model, prompt, ids, block_cfg)
        fns[f"cache@{n}"] = functools.partial(generate, model, prompt, ids, block_cfg.replace(prefix_cache=True))
    generate(model, prompt, ids, base.replace(max_new_tokens=lengths[0], steps=4))  # warm-up
    seconds = alternate(fns, max(2, sizes.reps // 2), warmup=False)
    return {
        "lengths": lengths,
        "block_size": block,
        "full_s": [statistics.median(seconds[f"full@{n}"]) for n in lengths],
        "block_s": [statistics.median(seconds[f"block@{n}"]) for n in lengths],
        "block_vs_full_time": [median_ratio(seconds[f"block@{n}"], seconds[f"full@{n}"]) for n in lengths],
        "block_cache_s": [statistics.median(seconds[f"cache@{n}"]) for n in lengths],
        "block_cache_vs_full_time": [median_ratio(seconds[f"cache@{n}"], seconds[f"full@{n}"]) for n in lengths],
    }


def sample_suite(subject: Subject, sizes: BenchSizes) -> dict[str, Any]:
    overhead = {str(v): overhead_share(subject, v, sizes) for v in sizes.overhead_vocabs}
    out = methods_suite(subject, sizes)
    out["overhead_share"] = {vocab: o["share"] for vocab, o in overhead.items()}
    out["overhead_by_strategy"] = {vocab: o["by_strategy"] for vocab, o in overhead.items()}
    out["length"] = length_suite(subject, sizes)
    return out
