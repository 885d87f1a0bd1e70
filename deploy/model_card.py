"""The model card (README.md) of a published model: YAML metadata with `model-index` eval results,
usage, architecture, training data and settings from the resolved run config, the eval table
and limitations. Every input may be missing or partial; the card says what is not available.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from dgpt_core.config import DataConfig, PretrainDataConfig, RunConfig, SFTDataConfig, read_folder_run_config
from dgpt_core.config.publish import PublishConfig
from dgpt_core.markdown import markdown_table, significant

log = logging.getLogger(__name__)

TASK_TYPE = "text-generation"
BASE_TAGS = ["text-diffusion", "masked-diffusion", "diffusion-lm", "mdlm", "modernbert", "custom_code"]
DATASET_NAMES = {
    "dgpt_skills": "held-out synthetic skills (exact match)",
    "dgpt_chitchat_mc": "chitchat next-reply multiple choice",
    "dgpt_heldout_text": "held-out pretraining text",
    "dgpt_world": "synthetic world of people: questions about held-out people, reversal, biographies",
}
SKIPPED_METRICS = {"n", "steps", "nfe", "nfe_total", "seconds", "ms_per_sample", "n_samples"}
"""Counters and timings: kept in eval/<name>/metrics.json, not in model-index or the card table."""
REPETITION_METRICS = ("distinct_2", "rep_4", "loop_rate", "stop_rate")


@dataclass(frozen=True)
class EvalRecord:
    """One headline number of an eval run."""

    dataset_type: str
    dataset_name: str
    metric: str
    value: float
    strategy: str | None = None
    metric_name: str | None = None

    @property
    def label(self) -> str:
        name = self.metric_name or self.metric
        return f"{self.dataset_type}: {name}" + (f" [{self.strategy}]" if self.strategy else "")

    def to_eval_result(self) -> EvalResult:
        return EvalResult(
            task_type=TASK_TYPE,
            task_name="Text Generation",
            dataset_type=self.dataset_type,
            dataset_name=self.dataset_name,
            metric_type=self.metric,
            metric_value=self.value,
            metric_name=self.metric_name or self.metric,
            metric_config=self.strategy,
        )


def load_metrics(eval_dir: Path) -> dict[str, Any] | None:
    """metrics.json of an eval folder; None (with a warning) when missing or unreadable."""
    path = Path(eval_dir) / "metrics.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("no usable eval metrics at %s (%s)", path, type(err).__name__)
        return None
    return data if isinstance(data, dict) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _keep(metric: str) -> bool:
    return metric not in SKIPPED_METRICS and not metric.startswith("n_") and not metric.endswith("_stderr")


def eval_records(metrics: dict[str, Any]) -> list[EvalRecord]:
    """Headline numbers of a metrics.json (ppl_bound, benchmarks, repetition), tolerating any
    missing or partial section. Per-skill breakdowns, counters and timings are left out."""
    records: list[EvalRecord] = []
    ppl = metrics.get("ppl_bound") or {}
    for key, entry, dataset in (
        ("dgpt_heldout_text_elbo", ppl, "held-out text"),
        ("dgpt_heldout_answers_elbo", ppl.get("conditional") or {}, "held-out SFT answers given prompts"),
    ):
        value = _number(entry.get("value")) if isinstance(entry, dict) else None
        if value is not None:
            name = str(entry.get("dataset") or dataset)
            records.append(EvalRecord(key, name, "perplexity", value, metric_name="perplexity upper bound"))
    for task, result in (metrics.get("benchmarks") or {}).items():
        if not isinstance(result, dict):
            continue
        per_strategy = bool(result) and all(isinstance(v, dict) for v in result.values())
        groups = result.items() if per_strategy else [(None, result)]
        for strategy, values in groups:
            for metric, raw in values.items():
                value = _number(raw)
                breakdown = task == "dgpt_skills" and metric.startswith("exact_match_")
                if value is not None and _keep(metric) and not breakdown:
                    records.append(EvalRecord(task, DATASET_NAMES.get(task, task), metric, value, strategy))
    for strategy, values in (metrics.get("repetition") or {}).items():
        for metric in REPETITION_METRICS:
            value = _number(values.get(metric)) if isinstance(values, dict) else None
            if value is not None:
                records.append(
                    EvalRecord("dgpt_repetition", "free generation (repetition)", metric, value, strategy)
                )
    return records


def parameter_count(folder: Path) -> int | None:
    """Number of weights in model.safetensors, read from its header (no tensors loaded)."""
    path = folder / "model.safetensors"
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return None
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_config(folder: Path) -> RunConfig | None:
    """The folder's run_config.yaml; None (the card says so) when it has none or an invalid one."""
    try:
        return read_folder_run_config(folder)
    except ValueError as err:
        log.warning("%s; the card will lack training settings", err)
        return None


def _sources(stage: PretrainDataConfig | SFTDataConfig) -> str | None:
    parts = []
    for s in stage.sources:
        extra = []
        if s.weight != 1.0:
            extra.append(f"weight {s.weight}")
        if s.max_items:
            extra.append(f"at most {s.max_items} items")
        parts.append(f"`{s.name}`" + (f" ({', '.join(extra)})" if extra else ""))
    return ", ".join(parts) or None


def hub_datasets(data: DataConfig) -> list[str]:
    """Hub dataset ids among the data sources (the embedded offline sources have none)."""
    from dgpt_core.data.sources import ALIASES, REGISTRY

    ids: list[str] = []
    for stage in (data.pretrain, data.sft):
        for spec in stage.sources:
            name = ALIASES.get(spec.name, spec.name)
            hub_id = REGISTRY[name].hub_id if name in REGISTRY else name
            looks_local = name.startswith(("/", ".", "~")) or Path(name).suffix in {
                ".txt",
                ".jsonl",
                ".json",
                ".parquet",
            }
            if hub_id and "/" in hub_id and not looks_local and hub_id not in ids:
                ids.append(hub_id)
    return ids


def _training_section(run: RunConfig | None, train_metrics: dict[str, Any]) -> list[str]:
    if run is None:
        return ["## Training", "", "The resolved run configuration was not available.", ""]
    rows: list[list[Any]] = []
    for stage, s, data in (("pretrain", run.pretrain, run.data.pretrain), ("sft", run.sft, run.data.sft)):
        diff = s.diffusion
        if not s.enabled:
            rows.append([stage, "disabled", *[None] * 6])
            continue
        rows.append(
            [
                stage,
                _sources(data),
                s.max_steps,
                f"{s.per_device_batch_size} x {s.gradient_accumulation_steps}",
                f"{s.learning_rate} ({s.lr_scheduler})",
                s.precision,
                f"{diff.schedule}, {diff.loss_normalization} normalization",
                f"from {diff.edit_start} of training, p={diff.edit_prob}, insert p={diff.insert_prob}",
            ]
        )
    lines = [
        "## Training",
        "",
        f"Preset `{run.preset}`, seed {run.seed}; tokenizer: {run.tokenizer.kind} "
        f"(vocabulary {run.tokenizer.vocab_size}). Pretraining uses the masked-diffusion (MDLM) loss on "
        "packed plain text; SFT applies it to the final assistant answer only; the edit stage adds "
        "Seed-Diffusion-style token swaps the model learns to repair.",
        "",
        markdown_table(
            [
                "stage",
                "data",
                "steps",
                "batch x accumulation",
                "learning rate",
                "precision",
                "noise schedule",
                "edit corruption",
            ],
            rows,
            fmt=significant,
        ),
        "",
    ]
    if train_metrics:
        keys = [k for k in ("train_loss", "val_elbo", "train_runtime") if k in train_metrics]
        lines += [
            "Final stage metrics: " + ", ".join(f"{k} {significant(train_metrics[k])}" for k in keys) + ".",
            "",
        ]
    lines += ["The complete resolved configuration is in [`run_config.yaml`](run_config.yaml).", ""]
    return lines


def _eval_section(
    evals: dict[str, dict[str, Any]], links: dict[str, list[str]], primary: str | None
) -> list[str]:
    if not evals:
        return ["## Evaluation", "", "No evaluation results were published with this model.", ""]
    per_eval = {name: {r.label: r.value for r in eval_records(m)} for name, m in evals.items()}
    labels = list(dict.fromkeys(label for values in per_eval.values() for label in values))
    names = list(evals)
    lines = [
        "## Evaluation",
        "",
        f"Column `{primary}` is this model (its numbers are the card's `model-index`); other columns "
        "are reference models evaluated with the same suite. Perplexities are upper bounds from the "
        "diffusion ELBO; strategies in brackets are the unmasking orders of the sampler.",
        "",
    ]
    if labels:
        lines += [
            markdown_table(
                ["metric", *names], [[lab, *[per_eval[n].get(lab) for n in names]] for lab in labels], fmt=significant
            ),
            "",
        ]
    else:
        lines += ["The eval folders hold no numeric metrics.", ""]
    for name in names:
        files = links.get(name, [])
        plots = [f for f in files if f.endswith(".png")]
        docs = [f"[{Path(f).name}]({f})" for f in files if not f.endswith(".png")]
        if docs:
            lines.append(f"- `{name}`: " + ", ".join(docs))
        lines += [f"  ![{name} {Path(p).stem}]({p})" for p in plots]
    return [*lines, ""]


LIMITATIONS = """## Limitations

- A small research model trained on small data: it follows the synthetic data it saw (skills, small
  talk, or the facts of a synthetic world of people) and fails on anything else. It is not a
  general assistant.
- Answers are sampled on a fixed-length canvas by iterative unmasking (not left to right); quality
  depends on the number of steps and the unmasking strategy, and too few steps give incoherent text.
- It states false facts fluently and reproduces biases of its training conversations; do not use
  its output for decisions or as a source of facts.
- English only. The context is limited to the model's `max_position_embeddings` tokens.
- `trust_remote_code=True` runs this repo's `pipeline.py` and the sampler it imports
  (`sampler.py`, `options.py`, `ops.py`, `attention.py`, `schedules.py`); read them first
  (they import only torch and transformers).
"""


def build_model_card(
    folder: Path,
    cfg: PublishConfig,
    evals: dict[str, dict[str, Any]] | None = None,
    primary: str | None = None,
    eval_links: dict[str, list[str]] | None = None,
) -> ModelCard:
    """Card of the staged `folder` (config.json, run_config.yaml, train_metrics.json read from it).

    `evals` maps eval names to metrics.json contents; `primary` names the eval of this model (its
    headline numbers become `model-index`); `eval_links` lists each eval's files relative to the
    folder (reports and plots linked from the card).
    """
    evals = evals or {}
    run = _run_config(folder)
    config = _read_json(folder / "config.json")
    train_metrics = _read_json(folder / "train_metrics.json")
    name = (
        cfg.model_name or (cfg.repo_id or "").split("/")[-1] or f"diffusiongpt-{run.preset if run else 'model'}"
    )
    repo = cfg.repo_id or f"YOUR_NAMESPACE/{name}"
    records = eval_records(evals[primary]) if primary in evals else []
    data = ModelCardData(
        license=cfg.license,
        library_name="transformers",
        pipeline_tag=TASK_TYPE,
        tags=[*BASE_TAGS, *cfg.tags],
        datasets=(hub_datasets(run.data) if run else []) or None,
        language=["en"],
        model_name=name,
        eval_results=[r.to_eval_result() for r in records] or None,
    )
    params = parameter_count(folder)
    arch = [
        ["parameters", f"{params:,}" if params else None],
        ["hidden size", config.get("hidden_size")],
        ["layers", config.get("num_hidden_layers")],
        ["attention heads", config.get("num_attention_heads")],
        ["MLP width", config.get("intermediate_size")],
        ["max sequence length", config.get("max_position_embeddings")],
        ["vocabulary", config.get("vocab_size")],
        [
            "sampler defaults",
            json.dumps(config["sampler_defaults"]) if config.get("sampler_defaults") else None,
        ],
    ]
    body = [
        f"# {name}",
        "",
        "A chat model trained by **masked discrete diffusion** (MDLM loss with Seed-Diffusion-style edit "
        "corruption) on a ModernBERT encoder, made with diffusiongpt. It generates by starting from a canvas of "
        "`<|mask|>` tokens and unmasking them over a few denoising steps, not token by token.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'pipe = pipeline("text-diffusion", model="{repo}", trust_remote_code=True)',
        'chat = [{"role": "user", "content": "What is 12 plus 7?"}]',
        'print(pipe(chat)[0]["generated_text"])  # decodes with the sampler defaults in config.json',
        'print(pipe(chat, strategy="random", steps=4, seed=0)[0]["generated_text"])  # or any other setting',
        "",
        "# plain-text continuation, and the denoising process step by step",
        'print(pipe("Once upon a time", max_new_tokens=32)[0]["generated_text"])',
        "for update in pipe(chat, stream=True, steps=8):",
        '    print(update["step"], update["generated_text"])',
        "```",
        "",
        "Sampler options (any call keyword): `steps`, `max_new_tokens`, `strategy` (random, confidence, margin, "
        "entropy, threshold), `temperature`, `top_p`, `block_size` (semi-autoregressive blocks), `edit` "
        "(self-correction of revealed tokens, and deletion of tokens the model flags as spurious), `seed`. "
        "Unset options take the folder's `sampler_defaults` (chosen from this model's own eval).",
        "",
        "## Model",
        "",
        markdown_table(["field", "value"], arch, fmt=significant),
        "",
        *_training_section(run, train_metrics),
        *_eval_section(evals, eval_links or {}, primary),
        LIMITATIONS,
    ]
    text = "\n".join(body).rstrip() + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")
