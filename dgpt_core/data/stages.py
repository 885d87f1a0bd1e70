"""The data stages as plain functions: typed config in, finished folder with a manifest out.

    prepare_tokenizer_stage(tokenizer_cfg, data_cfg, out_dir)            -> out_dir (save_pretrained)
    prepare_pretrain_stage(data_cfg, tokenizer_dir, max_seq_len, out_dir) -> out_dir (DatasetDict)
    prepare_sft_stage(data_cfg, tokenizer_dir, max_seq_len, out_dir)      -> out_dir (DatasetDict)
    prepare_all(data_cfg, tokenizer_cfg, max_seq_len, out_dir)            -> {"tokenizer", "pretrain", "sft"}

Each stage folder holds its data, `report.md` + `report.json`, and `manifest.json` (written last).
A folder whose manifest key matches the current inputs and code is reused unless `force`.
Datasets load with `datasets.load_from_disk(folder)`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ..config import DataConfig, TokenizerConfig
from ..models.tokenizer import load_tokenizer, tokenizer_fingerprint
from . import skills as skills_mod
from .manifest import read_manifest, stage_key, staging, write_manifest
from .pretrain import (
    documents_dataset,
    flat_token_ids,
    pack,
    select_by_tokens,
    select_by_weight,
    take_streaming,
    tokenize_documents,
)
from .report import write_report
from .sft import STATUSES, SFTSettings, count_statuses, render_example, tokenize_batch
from .sources import LoadStats, iter_chat, iter_chat_routed, iter_text_routed, raise_on_errors, resolve
from .stage_cache import log, reuse_complete, tokenized_stage_inputs, uses_skills
from .tokenizer_stage import prepare_tokenizer_stage

MAX_REPORTED_FAILURES = 50


def _datasets():
    import datasets

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    datasets.disable_progress_bars()
    return datasets


def _failure_rows(failures: list) -> list[dict[str, Any]]:
    return [
        {"source": f.source, "file": f.file or "", "row": f.row, "line": f.line or "", "field": f.field,
         "code": f.code, "reason": f.reason, "value": f.value}
        for f in failures[:MAX_REPORTED_FAILURES]
    ]


def _dropped_rows(label: str, stats: LoadStats) -> list[dict[str, Any]]:
    """Rows dropped per file and reason (each dropped row once, under its first failure)."""
    return [{"source": label, "file": where, "reason": code, "rows": n}
            for where, reasons in stats.dropped.items() for code, n in reasons.most_common()]


def _no_training_data(stage: str, outcome: str, reads: list[tuple[str, LoadStats, str]], failures: list) -> ValueError:
    """The error of a stage left without training data: every file (or source) with its rows read
    and dropped per reason, and where the valid rows of each source went (`outcome`)."""
    parts = []
    for label, stats, went in reads:
        part = stats.summary() or f"{label}: 0 read"
        if stats.kept:
            part += (", " if list(stats.read) == [label] else f"; {label}: ") + f"{stats.kept} valid {went}"
        parts.append(part)
    head = outcome if any(stats.kept for _, stats, _ in reads) else f"no valid {stage} rows"
    hint = f"\n  first dropped row: {failures[0].describe()}" if failures else ""
    return ValueError(f"{head}: {'; '.join(parts)}{hint}")


# ---------------------------------------------------------------------------------------------
# pretraining


def _lengths(ds) -> np.ndarray:
    if not len(ds):
        return np.zeros(0, dtype=np.int64)
    return pc.list_value_length(ds.with_format("arrow")[:]["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)


def _val_subset(n: int, ratio: float, seed: int) -> np.ndarray:
    if ratio >= 1:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[: round(ratio * n)])


def prepare_pretrain_stage(
    data_cfg: DataConfig, tokenizer_dir: str | Path, max_seq_len: int, out_dir: str | Path, force: bool = False
) -> Path:
    """Tokenize (eos after every document), mix, shuffle, split and pack the pretraining text."""
    datasets = _datasets()
    out_dir, pcfg = Path(out_dir), data_cfg.pretrain
    tok = load_tokenizer(tokenizer_dir)
    fingerprint = tokenizer_fingerprint(tok)
    inputs = tokenized_stage_inputs(data_cfg, "pretrain", fingerprint, max_seq_len)
    key = stage_key("pretrain", inputs)
    if reuse_complete(out_dir, key, force, "pretrain"):
        return out_dir
    t0 = time.perf_counter()
    wsum = sum(s.weight for s in pcfg.sources)
    parts: dict[str, list] = {"train": [], "validation": []}
    rows, failures, dropped, reads, tok_seconds, tok_bytes = [], [], [], [], 0.0, 0
    for i, spec in enumerate(pcfg.sources):
        res, stats = resolve(spec), LoadStats()
        target = int(pcfg.token_budget * spec.weight / wsum) if pcfg.token_budget else None
        if res.streaming:
            if target is None:
                raise ValueError(f"source {res.label!r} streams: set data.pretrain.token_budget")
            ts = time.perf_counter()
            got = take_streaming(iter_text_routed(res, data_cfg, stats), tok, target, pcfg.batch_size)
            tok_seconds += time.perf_counter() - ts
            raise_on_errors(res, stats)
            src = {sp: documents_dataset(got[sp]) for sp in got}
            tok_bytes += sum(sum(got[sp]["num_bytes"]) for sp in got)
            selected = int(_lengths(src["train"]).sum())
            n_train = len(src["train"])
        else:
            texts: dict[str, list[str]] = {"train": [], "validation": []}
            for sp, text in iter_text_routed(res, data_cfg, stats):
                texts[sp].append(text)
            raise_on_errors(res, stats)
            n_train = len(texts["train"])
            if target is None:  # select documents first: only what is used gets tokenized
                idx = select_by_weight(n_train, spec.weight, data_cfg.seed + i)
                ratio = len(idx) / n_train if n_train else 0.0
                keep = {"train": np.unique(idx), "validation": _val_subset(len(texts["validation"]), ratio, data_cfg.seed + i)}
            else:
                keep = {sp: np.arange(len(t)) for sp, t in texts.items()}
            texts = {sp: [texts[sp][j] for j in keep[sp]] for sp in texts}
            ts = time.perf_counter()
            src = {sp: tokenize_documents(texts[sp], tok, data_cfg.num_proc, pcfg.batch_size) for sp in texts}
            tok_seconds += time.perf_counter() - ts
            tok_bytes += sum(len(t.encode("utf-8")) for sp in texts for t in texts[sp])
            lengths = _lengths(src["train"])
            if target is None:  # positions of the selected (possibly repeated) documents
                pos = np.searchsorted(keep["train"], idx)
                selected = int(lengths[pos].sum()) if len(pos) else 0
                src["train"] = src["train"].select(pos)
            else:
                pos = select_by_tokens(lengths, target, data_cfg.seed + i)
                selected = int(lengths[pos].sum()) if len(pos) else 0
                ratio = selected / int(lengths.sum()) if len(lengths) else 0.0
                src = {"train": src["train"].select(pos),
                       "validation": src["validation"].select(_val_subset(len(src["validation"]), ratio, data_cfg.seed + i))}
        failures += stats.failures
        dropped += _dropped_rows(res.label, stats)
        reads.append((res.label, stats, f"({n_train} train, {len(src['validation'])} validation)"
                      + (f", {len(src['train'])} taken at weight {spec.weight:g}" if len(src["train"]) != n_train else "")))
        rows.append({"source": res.label, "rows_read": stats.rows, "invalid": stats.rows - stats.kept,
                     "train_docs_available": n_train, "train_docs": len(src["train"]),
                     "validation_docs": len(src["validation"]), "train_tokens": selected,
                     "validation_tokens": int(_lengths(src["validation"]).sum())})
        for sp in parts:
            parts[sp].append(src[sp].select_columns(["input_ids"]))
    splits, pack_stats = {}, {}
    for sp, dss in parts.items():
        docs = datasets.concatenate_datasets(dss) if dss else documents_dataset({"input_ids": [], "num_bytes": []})
        order = np.random.default_rng(data_cfg.seed).permutation(len(docs))
        splits[sp], pack_stats[sp] = pack(flat_token_ids(docs.select(order)), max_seq_len, pcfg.keep_remainder)
    seconds = time.perf_counter() - t0
    tokens = {sp: {"tokens_in": st.tokens_in, "tokens_out": st.tokens_out, "sequences": st.sequences,
                   "full_sequences": st.full_sequences, "remainder_tokens": st.remainder_tokens,
                   "remainder_kept": st.remainder_kept} for sp, st in pack_stats.items()}
    mb_s = tok_bytes / 1e6 / tok_seconds if tok_seconds else 0.0
    splits = {sp: d for sp, d in splits.items() if len(d)}  # an empty split cannot round-trip save_to_disk
    if "train" not in splits:
        raise _no_training_data("pretraining", "no pretraining training documents", reads, failures)
    with staging(out_dir) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        sample = splits["train"][0]["input_ids"]
        write_report(tmp, {
            "title": "Pretraining data",
            "summary": {"max_seq_len": max_seq_len, "num_proc": data_cfg.num_proc,
                        **{f"{sp}_sequences": t["sequences"] for sp, t in tokens.items()},
                        **{f"{sp}_tokens": t["tokens_out"] for sp, t in tokens.items()},
                        "tokenize_MB": round(tok_bytes / 1e6, 2), "tokenize_seconds": round(tok_seconds, 2),
                        "tokenize_MB_per_s": round(mb_s, 2), "seconds": round(seconds, 2)},
            "tables": {"Sources": rows, "Dropped rows": dropped,
                       "Packing": [{"split": sp, **t} for sp, t in tokens.items()]},
            "failures": _failure_rows(failures), "failure_count": len(failures),
            "examples": [{"title": "first training sequence", "text": tok.decode(sample)}],
        })
        write_manifest(tmp, {
            "stage": "pretrain", "key": key, "inputs": inputs,
            "tokenizer": {"path": str(tokenizer_dir), "fingerprint": fingerprint},
            "max_seq_len": max_seq_len, "splits": {sp: len(d) for sp, d in splits.items()},
            "counts": {"sources": rows, "invalid_rows": sum(r["invalid"] for r in rows), "dropped_rows": dropped},
            "tokens": tokens,
            "throughput": {"tokenize_bytes": tok_bytes, "tokenize_seconds": round(tok_seconds, 3),
                           "MB_per_s": round(mb_s, 3), "num_proc": data_cfg.num_proc},
            "seconds": round(seconds, 2),
        })
    log.info("pretrain stage: %s %s in %.1fs", out_dir, {sp: len(d) for sp, d in splits.items()}, seconds)
    return out_dir


# ---------------------------------------------------------------------------------------------
# SFT

SFT_COLUMNS = ["input_ids", "eligible_mask", "source", "skill"]


def _tokenize_conversations(convs: list[dict], tok, settings: SFTSettings, label: str, num_proc: int):
    """Conversations -> (ok examples, counters) via datasets.map(tokenize_batch)."""
    datasets = _datasets()
    if not convs:
        empty = datasets.Dataset.from_dict({"input_ids": [], "eligible_mask": [], "source": [], "skill": []})
        return empty, count_statuses(datasets.Dataset.from_dict(
            {"status": [], "truncated": [], "dropped_turns": [], "short_padding": []}))
    ds = datasets.Dataset.from_list(convs)
    out = ds.map(
        tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 and len(ds) >= 512 else None,
        remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tok, "settings": settings, "source": label},
        desc=f"sft {label}",
    )
    counts = count_statuses(out)
    counts["answer_tokens"] = _percentiles([a for a, st in zip(out["answer_tokens"], out["status"]) if st == "ok"])
    ok = out.filter(lambda st: st == "ok", input_columns="status").select_columns(SFT_COLUMNS)
    return ok, counts


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"mean": round(float(arr.mean()), 1), "p50": float(np.percentile(arr, 50)),
            "p95": float(np.percentile(arr, 95)), "max": int(arr.max())}


def _sft_outcome(train: int, validation: int, taken: int, weight: float, tc: dict, examples: int, selected: int) -> str:
    """Where a source's valid conversations went (for the error of a stage without training examples)."""
    out = f"({train} train, {validation} validation)"
    if taken != train:
        out += f", {taken} taken at weight {weight:g}"
    if taken:
        drops = ", ".join(f"{st}: {tc[f'status_{st}']}" for st in STATUSES[1:] if tc[f"status_{st}"])
        out += f", {examples} train examples" + (f" ({drops})" if drops else "")
        out += f", {selected} selected" if selected != examples else ""
    return out


def prepare_sft_stage(
    data_cfg: DataConfig, tokenizer_dir: str | Path, max_seq_len: int, out_dir: str | Path, force: bool = False
) -> Path:
    """Conversations -> one example per assistant turn with assistant-only eligibility masks,
    mixed and shuffled; splits train / validation (/ test: the held-out skills, also exported as
    skills_test.jsonl for the eval suite)."""
    datasets = _datasets()
    out_dir, scfg = Path(out_dir), data_cfg.sft
    tok = load_tokenizer(tokenizer_dir)
    fingerprint = tokenizer_fingerprint(tok)
    settings = SFTSettings.build(scfg, max_seq_len, tok)
    inputs = tokenized_stage_inputs(data_cfg, "sft", fingerprint, max_seq_len)
    key = stage_key("sft", inputs)
    if reuse_complete(out_dir, key, force, "sft"):
        return out_dir
    t0 = time.perf_counter()
    wsum = sum(s.weight for s in scfg.sources)
    parts: dict[str, list] = {"train": [], "validation": [], "test": []}
    rows, failures, dropped, reads, examples, counters = [], [], [], [], [], {}
    for i, spec in enumerate(scfg.sources):
        res, stats = resolve(spec), LoadStats()
        if res.kind == "text":
            raise ValueError(f"SFT source {res.label!r} is a text source; SFT needs chat (messages) data")
        if res.streaming and spec.max_items is None:
            raise ValueError(f"SFT source {res.label!r} streams: set its max_items (conversations to read)")
        convs: dict[str, list[dict]] = {"train": [], "validation": []}
        for sp, conv in iter_chat_routed(res, data_cfg, stats):
            convs[sp].append(conv)
        if res.builtin == "skills":
            convs["test"] = list(iter_chat(res, data_cfg, "test", LoadStats()))
        raise_on_errors(res, stats)
        failures += stats.failures
        dropped += _dropped_rows(res.label, stats)
        n_conv, n_val = len(convs["train"]), len(convs["validation"])
        if scfg.max_examples is None:  # select conversations first: only what is used gets tokenized
            cidx = select_by_weight(n_conv, spec.weight, data_cfg.seed + i)
            ratio = len(cidx) / n_conv if n_conv else 0.0
            convs["train"] = [convs["train"][j] for j in cidx]
            convs["validation"] = [convs["validation"][j] for j in _val_subset(len(convs["validation"]), ratio, data_cfg.seed + i)]
        src, counts = {}, {}
        for sp, cs in convs.items():
            src[sp], counts[sp] = _tokenize_conversations(cs, tok, settings, res.label, data_cfg.num_proc)
        n = len(src["train"])
        if scfg.max_examples is not None:
            target = int(scfg.max_examples * spec.weight / wsum)
            idx = select_by_tokens(np.ones(n, dtype=np.int64), target, data_cfg.seed + i) if n else np.zeros(0, int)
            ratio = len(idx) / n if n else 0.0
            src["validation"] = src["validation"].select(_val_subset(len(src["validation"]), ratio, data_cfg.seed + i))
        else:
            idx = np.arange(n)
        for k in range(min(scfg.num_report_examples, n)):
            ex = src["train"][k]
            examples.append({"title": f"{res.label} example {k}" + (f" ({ex['skill']})" if ex["skill"] else ""),
                             "text": render_example(tok, ex["input_ids"], ex["eligible_mask"])})
        src["train"] = src["train"].select(idx)
        for sp in src:
            parts[sp].append(src[sp])
        counters[res.label] = counts
        tc = counts["train"]
        reads.append((res.label, stats, _sft_outcome(n_conv, n_val, len(convs["train"]), spec.weight, tc, n, len(idx))))
        rows.append({"source": res.label, "conversations": stats.rows, "invalid": stats.rows - stats.kept,
                     "train_convs": len(convs["train"]), "assistant_turns": tc["assistant_turns"],
                     "examples": n, "selected": len(idx), "validation": len(src["validation"]),
                     "test": len(src.get("test", [])), "long_answer_dropped": tc["status_dropped_long_answer"],
                     "prompt_too_long": tc["status_dropped_prompt_too_long"], "zero_answer": tc["status_zero_answer_tokens"],
                     "truncated": tc["truncated_answers"], "ctx_dropped": tc["examples_with_dropped_context"],
                     "short_padding": tc["short_padding"]})
    splits = {}
    for sp, dss in parts.items():
        dss = [d for d in dss if len(d)]
        if not dss:
            continue
        merged = datasets.concatenate_datasets(dss)
        splits[sp] = merged.select(np.random.default_rng(data_cfg.seed).permutation(len(merged)))
    if "train" not in splits:
        raise _no_training_data("SFT", "no SFT training examples", reads, failures)
    token_totals = {sp: {"examples": len(d), "tokens": int(_lengths(d).sum()),
                         "eligible_tokens": int(sum(sum(m) for m in d["eligible_mask"])),
                         "length": _percentiles(_lengths(d).tolist())} for sp, d in splits.items()}
    skills_rows = []
    if "train" in splits and any(splits["train"]["skill"]):
        from collections import Counter

        for sp, d in splits.items():
            for skill, c in sorted(Counter(d["skill"]).items()):
                skills_rows.append({"split": sp, "skill": skill or "(chat)", "examples": c})
    seconds = time.perf_counter() - t0
    with staging(out_dir) as tmp:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        exported = {}
        if uses_skills(scfg.sources):
            for sp in ("test", "validation"):
                path = skills_mod.write_skills_jsonl(skills_mod.generate_skills(data_cfg.skills, sp), tmp / f"skills_{sp}.jsonl")
                exported[sp] = path.name
        write_report(tmp, {
            "title": "SFT data",
            "summary": {"max_seq_len": max_seq_len, "answer_padding": scfg.answer_padding,
                        "answer_canvas": scfg.answer_canvas, "long_answer_canvas": scfg.long_answer_canvas,
                        "long_answer": scfg.long_answer,
                        **{f"{sp}_examples": len(d) for sp, d in splits.items()},
                        "invalid_conversations": sum(r["invalid"] for r in rows), "seconds": round(seconds, 2)},
            "tables": {"Sources (train split counts)": rows, "Dropped rows": dropped,
                       "Splits": [{"split": sp, **{k: v for k, v in t.items() if k != "length"}, **t["length"]}
                                  for sp, t in token_totals.items()],
                       "Skills": skills_rows},
            "failures": _failure_rows(failures), "failure_count": len(failures),
            "examples": examples,
        })
        write_manifest(tmp, {
            "stage": "sft", "key": key, "inputs": inputs,
            "tokenizer": {"path": str(tokenizer_dir), "fingerprint": fingerprint},
            "max_seq_len": max_seq_len, "splits": {sp: len(d) for sp, d in splits.items()},
            "columns": SFT_COLUMNS, "skills_jsonl": exported,
            "counts": {"sources": rows, "statuses": counters, "invalid_conversations": sum(r["invalid"] for r in rows),
                       "dropped_rows": dropped},
            "tokens": token_totals, "seconds": round(seconds, 2),
        })
    log.info("sft stage: %s %s in %.1fs", out_dir, {sp: len(d) for sp, d in splits.items()}, seconds)
    return out_dir


# ---------------------------------------------------------------------------------------------


def prepare_all(
    data_cfg: DataConfig, tokenizer_cfg: TokenizerConfig, max_seq_len: int, out_dir: str | Path, force: bool = False
) -> dict[str, Path]:
    """Tokenizer, pretraining and SFT stages into `out_dir/{tokenizer,pretrain,sft}`."""
    out_dir = Path(out_dir)
    folders = {"tokenizer": prepare_tokenizer_stage(tokenizer_cfg, data_cfg, out_dir / "tokenizer", force)}
    if data_cfg.pretrain.enabled:
        folders["pretrain"] = prepare_pretrain_stage(data_cfg, folders["tokenizer"], max_seq_len, out_dir / "pretrain", force)
    if data_cfg.sft.enabled:
        folders["sft"] = prepare_sft_stage(data_cfg, folders["tokenizer"], max_seq_len, out_dir / "sft", force)
    return folders


def stage_summary(folder: str | Path) -> dict[str, Any]:
    """The manifest's headline numbers (for CLI output and logs)."""
    m = read_manifest(folder) or {}
    return {"stage": m.get("stage"), "splits": m.get("splits"), "seconds": m.get("seconds")}
