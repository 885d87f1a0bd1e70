"""bench.json, bench.md and the PNG plots of a `dgpt bench` run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.report import table, write_json

from .baseline import COMPARED
from .repetition import render_repetition
from .sample import QUALITY_TOLERANCE

TARGETS = {
    "decoding_nfe_speedup": 3.0,
    "decoding_tokens_per_s_speedup": 2.5,
    "sampler_overhead_share_max": 0.15,
    "train_throughput_ratio_min": 0.97,
    "collator_share_max": 0.02,
    # Our long-answer tokens/s over the KV-cached AR baseline's, per batch size of LONG_BATCHES (block
    # diffusion decodes several tokens a forward at batch 1; batched AR amortises its forwards better).
    "long_answer_vs_ar_tokens_per_s_batch_1": 1.0,
    "long_answer_vs_ar_tokens_per_s_batch_32": 0.5,
}


SWEEP_COSTS = ("method", "nfe", "nfe_per_prompt", "loop_rate", "rep_4", "tokens_per_s")
"""Keys of a sweep point that are not its workload's scores."""
WORKLOADS = {"skills": "the skills test items", "world": "the world's biography requests of held-out people"}
"""What each workload's decoding comparison runs on, for the section titles."""


def quality_keys(suite: dict[str, Any]) -> list[str]:
    """The scores that decide equal quality in a sample or baseline suite (exact match in files
    written before suites recorded them)."""
    return suite.get("quality_keys", ["exact_match"])


def score_keys(sample: dict[str, Any]) -> list[str]:
    """Every score of the sample suite's sweep points, the quality keys first."""
    point = next(iter(sample["sweep"].values()))
    keys = quality_keys(sample)
    return keys + [k for k in point if k not in SWEEP_COSTS and k not in keys]


def plot_methods(sample: dict[str, Any], path: Path) -> Path:
    """The headline quality score vs NFE and vs tokens/s, one series per decoding method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep, quality = sample["sweep"], quality_keys(sample)[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    methods = sorted({p["method"] for p in sweep.values()})
    for method in methods:
        points = sorted((p for p in sweep.values() if p["method"] == method), key=lambda p: p["nfe"])
        for ax, key in zip(axes, ("nfe", "tokens_per_s")):
            ax.plot([p[key] for p in points], [p[quality] for p in points], marker="o", label=method)
    for ax, label in zip(axes, ("forward passes per batch (NFE)", "answer tokens / s")):
        ax.set_xlabel(label)
        ax.set_ylabel(f"{sample.get('workload', 'skills')} {quality.replace('_', ' ')}")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_lengths(length: dict[str, Any], path: Path) -> Path:
    """Sampler seconds vs generation length, full canvas vs block decoding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(length["lengths"], length["full_s"], marker="o", label="full canvas")
    ax.plot(length["lengths"], length["block_s"], marker="o", label=f"blocks of {length['block_size']}")
    ax.plot(length["lengths"], length["block_cache_s"], marker="o",
            label=f"blocks of {length['block_size']}, prefix cache")
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("seconds (batch 1, NFE = length / 4)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def targets(result: dict[str, Any]) -> list[list[Any]]:
    """Rows (target, measured, goal, met) for whatever suites ran."""
    rows: list[list[Any]] = []
    sample, train = result.get("sample"), result.get("train")
    if sample:
        ok = sample["best_fast_within_quality"]
        rows.append(["decoding NFE speedup (quality kept)", sample["nfe_speedup"], ">= 3", ok and
                     sample["nfe_speedup"] >= TARGETS["decoding_nfe_speedup"]])
        rows.append(["decoding tokens/s speedup (quality kept)", sample["tokens_per_s_speedup"], ">= 2.5", ok and
                     sample["tokens_per_s_speedup"] >= TARGETS["decoding_tokens_per_s_speedup"]])
        for vocab, share in sample["overhead_share"].items():
            rows.append([f"sampler overhead share, vocab {vocab}", share, "< 0.15",
                         share < TARGETS["sampler_overhead_share_max"]])
    found = result.get("repetition", {}).get("findings")
    if found:
        rows.append(["repetition-safe confidence-family method (loop rate, rep-4 <= random, fact precision >=)",
                     found["safe_method"] or f"none (closest: {found['compared']})", "exists", found["target_met"]])
    base = result.get("baseline")
    for batch, ratio in (base or {}).get("ours_vs_ar_tokens_per_s", {}).items():
        best = max(ratio, base["ours_cache_vs_ar_tokens_per_s"][batch])
        target = TARGETS[f"long_answer_vs_ar_tokens_per_s_{batch}"]
        rows.append([f"long answers, ours (best of with and without prefix cache) / AR tokens/s, "
                     f"{batch.replace('_', ' ')}", best, f">= {target:g}", best >= target])
    if base and "reversal_ours_minus_ar" in base:
        gap = base["reversal_ours_minus_ar"]
        rows.append(["world reversal exact match, ours - AR", gap, "> 0", gap > 0])
    if train:
        for vocab, row in train["by_vocab"].items():
            rows.append([f"diffusion / MLM step throughput, vocab {vocab}", row["diffusion_vs_mlm_throughput"],
                         ">= 0.97", row["diffusion_vs_mlm_throughput"] >= TARGETS["train_throughput_ratio_min"]])
            rows.append([f"collator share, vocab {vocab}", row["collator_share"], "< 0.02",
                         row["collator_share"] < TARGETS["collator_share_max"]])
    return rows


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# dgpt bench", "", f"Model: {meta['model']}. Command: `{meta['command']}`.", "",
             f"Preset sizes: {meta['sizes']}; threads {meta['threads']}; torch {meta['torch']}.", ""]
    lines += [f"- {note}" for note in meta["notes"]] + [""]
    rows = targets(result)
    if rows:
        lines += ["## Targets", "", table(["target", "measured", "goal", "met"], rows), ""]
    if "train" in result:
        train = result["train"]
        lines += ["## Training step: diffusion vs plain masked LM", "",
                  table(["vocab", "stage", "batch x len", "diffusion tok/s", "MLM tok/s", "ratio", "collator share"],
                        [[v, kind, f"{r['batch']}x{r['seq_len']}", r[kind]["diffusion_tokens_per_s"],
                          r["mlm_tokens_per_s"], r[kind]["diffusion_vs_mlm_throughput"], r[kind]["collator_share"]]
                         for v, r in train["by_vocab"].items() for kind in ("masking", "edit") if kind in r]),
                  ""]
    if "sample" in result:
        sample = result["sample"]
        scores = score_keys(sample)
        names = [k.replace("_", " ") for k in scores]
        kept = " and ".join(names[: len(quality_keys(sample))])
        lines += [f"## Decoding methods on {WORKLOADS[sample.get('workload', 'skills')]}", "",
                  f"{sample['items']} items, canvas {sample['canvas']}, batch {sample['batch_size']}; reference "
                  f"`{sample['reference']}`, best fast setting `{sample['best_fast']}` (within quality: "
                  f"{sample['best_fast_within_quality']}): NFE x{sample['nfe_speedup']:.2f}, tokens/s "
                  f"x{sample['tokens_per_s_speedup']:.2f}. Within quality: {kept} "
                  f"each at most {QUALITY_TOLERANCE} below the reference's, loop rate no higher. Every prompt needs "
                  f"at least one forward pass, so no method can beat NFE x{sample['nfe_speedup_cap']:.2f} against "
                  "this reference.", "",
                  table(["method", "setting", "NFE per call", "NFE per prompt", "tokens/s", *names, "loop rate",
                         "rep-4"],
                        [[m, r["setting"], r["nfe"], r["nfe_per_prompt"], r["tokens_per_s"], *(r[k] for k in scores),
                          r["loop_rate"], r.get("rep_4")]
                         for m, r in sample["methods"].items()]), "",
                  "All settings:", "",
                  table(["setting", "NFE per call", "NFE per prompt", "tokens/s", *names, "loop rate", "rep-4"],
                        [[n, r["nfe"], r["nfe_per_prompt"], r["tokens_per_s"], *(r[k] for k in scores), r["loop_rate"],
                          r.get("rep_4")]
                         for n, r in sample["sweep"].items()]), "",
                  "![quality vs cost](methods.png)", ""]
        overhead = sample["overhead_by_strategy"]
        if overhead:  # measured at sizes.overhead_vocabs (none: not measured)
            lines += ["Sampler overhead: (sampler run time - time of replaying its model forwards alone) / that "
                      "forward time; batch 8, canvas 64, 32 steps, random weights, temperature 1 unless greedy:", "",
                      table(["vocab", *next(iter(overhead.values()))], [[v, *s.values()] for v, s in overhead.items()]),
                      ""]
        length = sample["length"]
        lines += ["Sampler time vs generation length:", "",
                  table(["tokens", "full canvas s", "block s", "block + cache s", "block / full",
                         "block + cache / full"],
                        [list(r) for r in zip(length["lengths"], length["full_s"], length["block_s"],
                                              length["block_cache_s"], length["block_vs_full_time"],
                                              length["block_cache_vs_full_time"])]), "",
                  "![time vs length](lengths.png)", ""]
    if "baseline" in result:
        lines += baseline_section(result["baseline"])
    lines += world_section(result)
    if "repetition" in result:
        lines += render_repetition(result["repetition"])
    if "compile" in result:
        lines += compile_section(result["compile"])
    return "\n".join(lines)


def baseline_section(base: dict[str, Any]) -> list[str]:
    """The AR baseline: perplexities and short-answer quality, then long-answer tokens/s at each
    batch size and both models' quality of those answers."""
    keys = ["parameters", "ppl", "answer_ppl", *quality_keys(base), "loop_rate", "nfe"]
    long = base["long_answers"]
    batches = list(base["ours_vs_ar_tokens_per_s"])
    scores = [*long["quality_keys"], "loop_rate", "nfe"]
    rows = [[key, base[key].get("method", "GPT-2 greedy, KV cache"), *(base[key]["tokens_per_s"][b] for b in batches),
             *(long[key].get(k) for k in scores)] for key in COMPARED]
    costs = [[f"{key} forwards", *(long[key]["cost"][b][c] for b in batches for c in ("token_forwards_per_answer", "forwards_per_token"))]
             for key in COMPARED if "cost" in long[key]]
    model = f"block-causal, blocks of {long['block_size']}" if long.get("block_size") else "full canvas"
    return ["## Autoregressive baseline (GPT-2, same parameter count and data)", "",
            f"Ours: perplexities are ELBO upper bounds; AR: exact. Short answers: ours decodes with "
            f"{base['ours']['method']}.", "",
            table(["model", *keys], [[k, *(base[k].get(c) for c in keys)] for k in ("ar", "ours")]), "",
            f"Long answers ({long['workload']}, canvas {long['canvas']}, items per batch size {long['items']}): answer "
            "tokens/s, all timed in one alternating loop, and the quality of the largest batch's answers.", "",
            table(["model", "method", *(f"tokens/s {b.replace('_', ' ')}" for b in batches),
                   *(k.replace("_", " ") for k in scores)], rows), "",
            table(["ratio", *(b.replace("_", " ") for b in batches)],
                  [[f"{key} / ar tokens/s", *(base[f"{key}_vs_ar_tokens_per_s"][b] for b in batches)]
                   for key in ("ours", "ours_cache")]), "",
            f"Cost of the same answers (ours: {model}), counted at the input embedding in one more untimed "
            "pass: token positions through the model per answer (padding included) and row-forwards per "
            "generated token.", "",
            table(["model", *(f"{c} {b.replace('_', ' ')}" for b in batches
                              for c in ("token-forwards / answer", "forwards / token"))], costs), "",
            *threshold_curve_lines(long, batches),
            f"AR training: {base['ar']['training']['stages']}.", ""]


def threshold_curve_lines(long: dict[str, Any], batches: list[str]) -> list[str]:
    """Threshold decoding of the long answers at each tau of the curve (exact cache): our tokens/s
    over AR's, forwards per generated token and quality."""
    curve = long.get("threshold_curve")
    if not curve:
        return []
    scores = [*long["quality_keys"], "loop_rate"]
    rows = [[point["threshold"], *(point["vs_ar_tokens_per_s"][b] for b in batches),
             *(point["cost"][b]["forwards_per_token"] for b in batches), *(point[k] for k in scores)]
            for point in curve]
    return ["Threshold decoding of the same answers with the exact cache, by threshold tau (same timing loop):", "",
            table(["tau", *(f"ours / ar tokens/s {b.replace('_', ' ')}" for b in batches),
                   *(f"forwards / token {b.replace('_', ' ')}" for b in batches), *(k.replace("_", " ") for k in scores)],
                  rows), ""]


def compile_section(compiled: dict[str, Any]) -> list[str]:
    """torch.compile of the backbone: compile seconds, eager vs compiled speed, kept or not."""
    rows = []
    for use, unit in (("sampling", "tokens/s"), ("training", "s per step")):
        part = compiled[use]
        if "error" in part:
            rows.append([use, part["error"], "", "", "", "", compiled["kept"][use]])
            continue
        eager, fast = ((part["eager_tokens_per_s"], part["compiled_tokens_per_s"]) if use == "sampling"
                       else (part["eager_step_s"], part["compiled_step_s"]))
        rows.append([use, unit, part["compile_s"], eager, fast, part["speedup"], compiled["kept"][use]])
    return ["## torch.compile of the backbone", "",
            f"{compiled['device']}, {compiled['threads']} threads, torch {compiled['torch']}; compile seconds measured "
            "cold (empty Inductor cache).", "",
            table(["use", "unit", "compile s", "eager", "compiled", "speedup", "wins"], rows), ""]


def world_section(result: dict[str, Any]) -> list[str]:
    """The "World" section: long-answer decoding speed at equal fact quality, and the reversal
    curse (ours vs the AR baseline); empty when no suite ran on the world."""
    sample, base = result.get("sample", {}), result.get("baseline", {})
    lines: list[str] = []
    if sample.get("workload") == "world":
        ref, best = sample["sweep"][sample["reference"]], sample["sweep"][sample["best_fast"]]
        lines += [f"Biography requests of {sample['items']} held-out people (canvas {sample['canvas']}): facts "
                  "found in each answer against the person's attributes.", "",
                  table(["setting", "role", "fact recall", "fact precision", "NFE per prompt", "tokens/s"],
                        [[sample["reference"], "reference (fixed-step ancestral)", ref["fact_recall"],
                          ref["fact_precision"], ref["nfe_per_prompt"], ref["tokens_per_s"]],
                         [sample["best_fast"], "best fast", best["fact_recall"], best["fact_precision"],
                          best["nfe_per_prompt"], best["tokens_per_s"]]]), "",
                  f"Best fast vs reference: NFE x{sample['nfe_speedup']:.2f} (target >= "
                  f"{TARGETS['decoding_nfe_speedup']:g}), tokens/s x{sample['tokens_per_s_speedup']:.2f} (target >= "
                  f"{TARGETS['decoding_tokens_per_s_speedup']:g}), equal quality: "
                  f"{sample['best_fast_within_quality']}.", ""]
    if base.get("workload") == "world":
        items = base["world_items"]
        lines += [f"Reversal curse: the name from a held-out person's birth date and city ({items['reversal']} "
                  f"questions), beside attribute questions about held-out people ({items['heldout']}); greedy AR "
                  f"vs our `{base['ours']['method']}`, exact match.", "",
                  table(["model", "reversal exact match", "held-out attribute exact match"],
                        [[k, base[k]["reversal_exact_match"], base[k]["heldout_exact_match"]] for k in ("ar", "ours")]),
                  "", f"Reversal exact match, ours - AR: {base['reversal_ours_minus_ar']:.3f}.", ""]
    return ["## World", "", *lines] if lines else []


def write_report(out_dir: Path, result: dict[str, Any], plots: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(out_dir / "bench.json", result)}
    (out_dir / "bench.md").write_text(render(result) + "\n")
    paths["md"] = out_dir / "bench.md"
    if plots and "sample" in result:
        paths["methods_plot"] = plot_methods(result["sample"], out_dir / "methods.png")
        paths["lengths_plot"] = plot_lengths(result["sample"]["length"], out_dir / "lengths.png")
    return paths
