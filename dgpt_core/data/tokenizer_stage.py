"""The tokenizer stage: train a byte-level BPE on the pretraining mixture or load a pretrained
tokenizer, check that skill words and numbers copy from prompt to answer, save it with its
special tokens and chat template."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig, TokenizerConfig
from ..models.tokenizer import load_tokenizer, special_token_ids, tokenizer_fingerprint, train_bpe_tokenizer
from . import skills as skills_mod
from .manifest import stage_key, staging, write_manifest
from .pretrain import select_by_weight
from .report import write_report
from .sources import LoadStats, iter_text_routed, resolve
from .stage_cache import log, reuse_complete, source_inputs, uses_skills


def tokenizer_corpus(data_cfg: DataConfig, max_chars: int | None, stats: dict[str, dict] | None = None) -> list[str]:
    """The BPE training text: train documents of the pretraining sources in the pretraining
    mixture (each finite source `weight` times, the same seeded selection the pretraining stage
    makes; a streaming source, or any source under a token budget, a weight-proportional share of
    `max_chars`), shuffled together and cut at `max_chars` characters."""
    pcfg = data_cfg.pretrain
    wsum = sum(s.weight for s in pcfg.sources)
    docs: list[tuple[str, str]] = []
    for i, spec in enumerate(pcfg.sources):
        res = resolve(spec)
        routed = (t for sp, t in iter_text_routed(res, data_cfg, LoadStats()) if sp == "train")
        if res.streaming or pcfg.token_budget is not None:
            if max_chars is None:
                raise ValueError(f"source {res.label!r} streams or has a token budget: set tokenizer.corpus_max_chars")
            share, got = max_chars * spec.weight / wsum, 0
            for text in routed:
                if got >= share:
                    break
                docs.append((res.label, text))
                got += len(text)
        else:
            texts = list(routed)
            docs += [(res.label, texts[j]) for j in select_by_weight(len(texts), spec.weight, data_cfg.seed + i)]
    out, total = [], 0
    for j in np.random.default_rng(data_cfg.seed).permutation(len(docs)):
        label, text = docs[j]
        if max_chars is not None and total + len(text) > max_chars:
            break
        total += len(text)
        out.append(text)
        if stats is not None:
            entry = stats.setdefault(label, {"docs": 0, "chars": 0})
            entry["docs"] += 1
            entry["chars"] += len(text)
    return out


def _copy_check(tok) -> dict[str, Any]:
    """Which skill vocabulary words are single tokens (with their leading space), and whether
    the answers of sample skill items are made of token ids that occur in their prompts."""
    words = sorted(set(skills_mod.WORDS + skills_mod.NAMES + skills_mod.CITIES + skills_mod.COLORS + skills_mod.PETS))
    multi = [w for w in words if len(tok(" " + w, add_special_tokens=False)["input_ids"]) != 1]
    items = skills_mod.generate_skills(skills_mod.SkillsConfig(train_per_skill=20, validation_per_skill=0, test_per_skill=0), "train")
    copy_items = [it for it in items if it.skill in ("repeat", "reverse", "sort", "fact", "larger")]
    ok = 0
    for it in copy_items:
        p = set(tok(it.prompt, add_special_tokens=False)["input_ids"])
        ok += all(t in p for t in tok(it.completion, add_special_tokens=False)["input_ids"])
    return {"skill_words": len(words), "multi_token_skill_words": multi,
            "copyable_answers": f"{ok}/{len(copy_items)}", "digits_example": tok.tokenize(" 1234 + 56")}


def prepare_tokenizer_stage(
    tokenizer_cfg: TokenizerConfig, data_cfg: DataConfig, out_dir: str | Path, force: bool = False
) -> Path:
    """Train the byte-level BPE on the pretraining text (train split) or load a pretrained
    tokenizer; save it with its special tokens and chat template."""
    out_dir = Path(out_dir)
    inputs: dict[str, Any] = {"tokenizer": tokenizer_cfg.model_dump(mode="json")}
    if tokenizer_cfg.kind == "bpe":
        inputs["corpus"] = source_inputs(data_cfg, data_cfg.pretrain.sources)
    key = stage_key("tokenizer", inputs)
    if reuse_complete(out_dir, key, force, "tokenizer"):
        return out_dir
    t0 = time.perf_counter()
    corpus_stats: dict[str, dict] = {}
    if tokenizer_cfg.kind == "bpe":
        tok = train_bpe_tokenizer(
            tokenizer_corpus(data_cfg, tokenizer_cfg.corpus_max_chars, corpus_stats),
            vocab_size=tokenizer_cfg.vocab_size,
            split_digits=tokenizer_cfg.split_digits,
            min_frequency=tokenizer_cfg.min_frequency,
        )
    else:
        tok = load_tokenizer(tokenizer_cfg.name_or_path)
    seconds = time.perf_counter() - t0
    fingerprint = tokenizer_fingerprint(tok)
    check = _copy_check(tok)
    if check["multi_token_skill_words"] and uses_skills(data_cfg.sft.sources):
        log.warning(
            "tokenizer: %d skill words are not single tokens (%s ...): the skills text is too rare in the "
            "BPE corpus; raise the skills weight in data.pretrain.sources (tiny default: chitchat 0.1, skills 2.0)",
            len(check["multi_token_skill_words"]), ", ".join(check["multi_token_skill_words"][:5]),
        )
    with staging(out_dir) as tmp:
        tok.save_pretrained(tmp)
        summary = {"kind": tokenizer_cfg.kind, "vocab_size": len(tok), "fingerprint": fingerprint,
                   "seconds": round(seconds, 2), **{k: v for k, v in check.items() if k != "multi_token_skill_words"},
                   "multi_token_skill_words": ", ".join(check["multi_token_skill_words"]) or "none"}
        write_report(tmp, {
            "title": "Tokenizer stage",
            "summary": summary,
            "tables": {"BPE training corpus (train split)": [{"source": k, **v} for k, v in corpus_stats.items()]},
            "examples": [{"title": "special tokens", "text": str(special_token_ids(tok))}],
        })
        write_manifest(tmp, {
            "stage": "tokenizer", "key": key, "inputs": inputs,
            "tokenizer": {"path": str(out_dir), "fingerprint": fingerprint, "vocab_size": len(tok),
                          "special_ids": special_token_ids(tok)},
            "counts": {"corpus": corpus_stats}, "seconds": round(seconds, 2),
        })
    log.info("tokenizer stage: %s (vocab %d) in %.1fs", out_dir, len(tok), seconds)
    return out_dir


