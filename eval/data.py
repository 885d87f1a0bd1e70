"""Held-out evaluation data, from explicit paths or rebuilt deterministically from the library.

The data config is the model folder's `run_config.yaml` (what it was trained on) when present,
else `DataConfig()` (the embedded default). Held-out rows are exactly the data stage's: skills
test items from `generate_skills(cfg, "test")`, validation rows by `sources.is_heldout` (via
`sources.iter_chat` / `iter_text`). Only embedded and local sources are read: Hub sources are
skipped (noted), so the eval runs offline on any folder.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dgpt_core.config import FOLDER_CONFIG_NAME, DataConfig, SourceSpec, read_folder_run_config
from dgpt_core.config.evaluation import EvalConfig
from dgpt_core.data.skills import SkillItem, generate_skills, read_skills_jsonl
from dgpt_core.data.sources import LoadStats, iter_chat, iter_text, render_chat_text, resolve

log = logging.getLogger(__name__)

PLAIN_ASSISTANT = "\nassistant:"
"""Plain-text prompts end like a user line of the pretraining text, then the assistant's prefix."""


def data_config_for(model_dir: str | Path) -> tuple[DataConfig, str]:
    """The data config the model was trained with (its run_config.yaml), else the default."""
    try:
        run = read_folder_run_config(model_dir)
    except ValueError as err:  # an older/foreign config: fall back, say so
        log.warning("%s; using the default data config", err)
        run = None
    if run is None:
        return DataConfig(), "default DataConfig()"
    return run.data, str(Path(model_dir) / FOLDER_CONFIG_NAME)


def _interleave(groups: Sequence[Sequence[Any]]) -> Iterator[Any]:
    """Round-robin over several lists (a mix of sources that survives a `limit`)."""
    for i in range(max((len(g) for g in groups), default=0)):
        for g in groups:
            if i < len(g):
                yield g[i]


def _usable(specs: Sequence[SourceSpec], fallback: Sequence[SourceSpec]) -> tuple[list[SourceSpec], list[str]]:
    """Embedded and local sources (Hub ones are skipped and noted); the fallback if none is left."""
    keep, notes = [], []
    for spec in specs:
        try:
            origin = resolve(spec).origin
        except FileNotFoundError as err:
            notes.append(f"skipped {spec.name}: {err}")
            continue
        if origin == "hub":
            notes.append(f"skipped Hub source {spec.name} (the eval reads offline sources only)")
        else:
            keep.append(spec)
    if not keep:
        keep = list(fallback)
        notes.append("using the embedded default sources")
    return keep, notes


# ----------------------------------------------------------------------------------------------
# prompts in the model's format


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], kind: str) -> str:
    """The text before an assistant reply: ChatML with the generation prompt (sft), or the
    pretraining text's `user: ...` lines followed by `assistant:` (pretrain)."""
    if kind == "sft":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return render_chat_text(messages) + PLAIN_ASSISTANT


def render_reply(reply: str, tokenizer: Any, kind: str) -> str:
    """A reply as it follows `render_prompt`: leading space (as in SFT data) and, in chat, <|im_end|>."""
    text = " " + reply.strip()
    return text + "<|im_end|>" if kind == "sft" else text


# ----------------------------------------------------------------------------------------------
# skills


def skills_items(cfg: EvalConfig, data_cfg: DataConfig) -> tuple[list[SkillItem], str]:
    """Held-out skills: cfg.skills_jsonl, else <sft_data_dir>/skills_test.jsonl, else generated."""
    if cfg.skills_jsonl:
        return read_skills_jsonl(cfg.skills_jsonl), str(cfg.skills_jsonl)
    if cfg.sft_data_dir and (Path(cfg.sft_data_dir) / "skills_test.jsonl").exists():
        path = Path(cfg.sft_data_dir) / "skills_test.jsonl"
        return read_skills_jsonl(path), str(path)
    return generate_skills(data_cfg.skills, "test"), f"generate_skills(seed={data_cfg.skills.seed}, 'test')"


def write_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def skills_task_rows(items: Sequence[SkillItem], tokenizer: Any, kind: str) -> list[dict]:
    """Records of the dgpt_skills task: the prompt rendered for the model, the exact answer."""
    return [
        {"context": render_prompt(tokenizer, item.prompt_messages, kind), "answer": item.answer,
         "skill": item.skill, "prompt": item.prompt, "key": item.key}
        for item in items
    ]


# ----------------------------------------------------------------------------------------------
# chitchat


def heldout_chitchat(data_cfg: DataConfig) -> list[dict]:
    """The chitchat conversations the data stage holds out (validation), in package order."""
    return [dict(c) for c in _heldout_chitchat(data_cfg.seed, data_cfg.validation_fraction)]


@functools.cache
def _heldout_chitchat(seed: int, fraction: float) -> tuple[dict, ...]:
    # the held-out rows depend only on the split seed and fraction
    cfg = DataConfig(seed=seed, validation_fraction=fraction)
    res = resolve(SourceSpec(name="chitchat"))
    return tuple({"id": c["row"], "messages": c["messages"]} for c in iter_chat(res, cfg, "validation", LoadStats()))


def chitchat_mc_items(data_cfg: DataConfig, cfg: EvalConfig) -> list[dict]:
    """Items {id, history, reply, distractors, label}: the real next reply of a held-out
    conversation among replies drawn from other held-out conversations (seeded)."""
    convs = heldout_chitchat(data_cfg)
    max_chars = cfg.chitchat_max_reply_chars
    replies = [
        (c["id"], m["content"]) for c in convs for m in c["messages"]
        if m["role"] == "assistant" and len(m["content"]) <= max_chars
    ]
    items = []
    for conv in convs:
        rng = random.Random(f"chitchat_mc|{cfg.seed}|{conv['id']}")
        msgs = conv["messages"]
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and len(m["content"]) <= max_chars]
        if not turns:
            continue
        turn = rng.choice(turns)
        reply = msgs[turn]["content"]
        pool = [r for cid, r in replies if cid != conv["id"] and r.strip() != reply.strip()]
        if len(pool) < cfg.chitchat_choices - 1:
            continue
        distractors = rng.sample(pool, cfg.chitchat_choices - 1)
        history = msgs[max(0, turn - cfg.chitchat_history) : turn]
        if history and history[0]["role"] != "user":
            history = history[1:]
        label = rng.randrange(cfg.chitchat_choices)
        items.append({"id": conv["id"], "history": history, "reply": reply, "distractors": distractors,
                      "label": label})
        if len(items) >= cfg.chitchat_items:
            break
    return items


def chitchat_task_rows(items: Sequence[dict], tokenizer: Any, kind: str) -> list[dict]:
    """Records of the dgpt_chitchat_mc task: rendered context, rendered choices, gold index."""
    rows = []
    for it in items:
        choices = [render_reply(d, tokenizer, kind) for d in it["distractors"]]
        choices.insert(it["label"], render_reply(it["reply"], tokenizer, kind))
        rows.append({"id": it["id"], "context": render_prompt(tokenizer, it["history"], kind),
                     "choices": choices, "label": it["label"]})
    return rows


# ----------------------------------------------------------------------------------------------
# perplexity data and repetition prompts


def heldout_documents(data_cfg: DataConfig) -> tuple[list[list[str]], str]:
    """Held-out pretraining documents per usable source, and a description."""
    docs, desc = _heldout_documents(data_cfg.model_dump_json())
    return [list(d) for d in docs], desc


@functools.lru_cache(maxsize=4)
def _heldout_documents(data_cfg_json: str) -> tuple[tuple[tuple[str, ...], ...], str]:
    data_cfg = DataConfig.model_validate_json(data_cfg_json)
    specs, notes = _usable(data_cfg.pretrain.sources, DataConfig().pretrain.sources)
    docs, names = [], []
    for spec in specs:
        res = resolve(spec)
        got = tuple(d for d in iter_text(res, data_cfg, "validation", LoadStats()) if d.strip())
        if got:
            docs.append(got)
            names.append(f"{res.label} ({len(got)} docs)")
    desc = "held-out pretraining text: " + ", ".join(names) + ("; " + "; ".join(notes) if notes else "")
    return tuple(docs), desc


def pretrain_sequences(
    cfg: EvalConfig, data_cfg: DataConfig, tokenizer: Any, max_len: int, n: int
) -> tuple[list[list[int]], str]:
    """Up to n held-out sequences of at most max_len tokens (documents + eos, packed per source,
    sources interleaved): the pretraining data folder's validation split when given."""
    if cfg.pretrain_data_dir:
        import datasets

        split = datasets.load_from_disk(cfg.pretrain_data_dir)["validation"]
        seqs = [list(s)[:max_len] for s in split.select(range(min(n, len(split))))["input_ids"]]
        return seqs, f"{cfg.pretrain_data_dir} (validation split)"
    docs, desc = heldout_documents(data_cfg)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    groups = []
    for source_docs in docs:
        flat: list[int] = []
        for doc in source_docs:
            flat.extend(tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos])
            if len(flat) >= n * max_len:
                break
        groups.append([flat[i : i + max_len] for i in range(0, len(flat), max_len)])
    seqs = list(_interleave(groups))[:n]
    return seqs, f"{desc}; packed to {max_len} tokens"


def sft_examples(
    cfg: EvalConfig, data_cfg: DataConfig, tokenizer: Any, max_len: int, n: int
) -> tuple[list[tuple[list[int], list[int]]], str]:
    """Up to n held-out SFT examples (input_ids, eligible_mask): the SFT data folder's validation
    split when given, else built from the data config's chat sources with the SFT settings."""
    if cfg.sft_data_dir:
        import datasets

        split = datasets.load_from_disk(cfg.sft_data_dir)["validation"]
        part = split.select(range(min(n, len(split))))
        return list(zip(part["input_ids"], part["eligible_mask"])), f"{cfg.sft_data_dir} (validation split)"
    from dgpt_core.data.sft import SFTSettings, tokenize_batch

    specs, notes = _usable(data_cfg.sft.sources, DataConfig().sft.sources)
    settings = SFTSettings.build(data_cfg.sft, max_len, tokenizer)
    groups, names = [], []
    for spec in specs:
        res = resolve(spec)
        if res.kind == "text":
            continue
        convs = []
        for conv in iter_chat(res, data_cfg, "validation", LoadStats()):
            convs.append(conv)
            if len(convs) >= n:
                break
        if not convs:
            continue
        batch = {"messages": [c["messages"] for c in convs], "skill": [c.get("skill", "") for c in convs],
                 "row": [c.get("row", i) for i, c in enumerate(convs)]}
        out = tokenize_batch(batch, tokenizer, settings, res.label)
        ok = [(ids, m) for ids, m, st in zip(out["input_ids"], out["eligible_mask"], out["status"]) if st == "ok"]
        groups.append(ok)
        names.append(f"{res.label} ({len(ok)} examples)")
    desc = "held-out SFT answers given prompts: " + ", ".join(names) + ("; " + "; ".join(notes) if notes else "")
    return list(_interleave(groups))[:n], desc


def plain_prompts(cfg: EvalConfig, data_cfg: DataConfig, tokenizer: Any, n: int) -> list[list[int]]:
    """The first plain_prompt_tokens tokens of held-out documents (sources interleaved)."""
    k = cfg.plain_prompt_tokens
    if cfg.pretrain_data_dir:
        import datasets

        split = datasets.load_from_disk(cfg.pretrain_data_dir)["validation"]
        return [list(s)[:k] for s in split.select(range(min(n, len(split))))["input_ids"]]
    docs, _ = heldout_documents(data_cfg)
    groups = []
    for source_docs in docs:
        got = []
        for doc in source_docs:
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            if len(ids) >= k + 4:
                got.append(ids[:k])
            if len(got) >= n:
                break
        groups.append(got)
    return list(_interleave(groups))[:n]


def chat_prompts(data_cfg: DataConfig, tokenizer: Any, n: int, max_prompt_tokens: int) -> list[list[int]]:
    """Held-out chitchat openings (the first user message) rendered with the chat template."""
    convs = []
    for conv in heldout_chitchat(data_cfg):
        text = render_prompt(tokenizer, conv["messages"][:1], "sft")
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) <= max_prompt_tokens:
            convs.append(ids)
        if len(convs) >= n:
            break
    return convs[:n]
