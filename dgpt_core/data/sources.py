"""Named data sources, their column mappings, loading (Hub, local, embedded) and validation.

Every source yields rows with a stable `key` (used by the seeded held-out split, so the same rows
are held out in every stage) and, for chat, messages validated here: unknown roles, non-string or
empty content, conversations without an assistant turn and rows that are not UTF-8 become
`Failure` records naming the file, line or row, and field, counted per file and reason in
`LoadStats`. Hub names are checked with `require_hub` first, so offline they fail within
seconds with a message that says how to run offline.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import DataConfig, SourceSpec
from ..hub import hub_error_message, require_hub
from . import chitchat, skills, world
from .local_files import BadRow, is_local, local_paths, local_rows

os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")  # local loads would otherwise ping the Hub

ROLES = ("system", "user", "assistant")
Kind = Literal["text", "chat"]


@dataclass(frozen=True)
class RegistryEntry:
    """Defaults for a named source."""

    kind: Kind
    hub_id: str | None = None
    config: str | None = None
    split: str = "train"
    streaming: bool = False
    text_field: str = "text"
    messages_field: str = "messages"
    drop_reasoning: bool = False
    builtin: str | None = None
    description: str = ""


REGISTRY: dict[str, RegistryEntry] = {
    "chitchat": RegistryEntry("chat", builtin="chitchat", description="PyPI chitchat-dataset, ~7k human small-talk chats (offline)"),
    "skills": RegistryEntry("chat", builtin="skills", description="synthetic exactly-checkable skills (offline)"),
    "world": RegistryEntry("chat", builtin="world", description="synthetic people: biographies as text, questions "
                           "about train people as chat (offline)"),
    "roneneldan/TinyStories": RegistryEntry("text", "roneneldan/TinyStories", description="short simple stories"),
    "HuggingFaceFW/fineweb": RegistryEntry("text", "HuggingFaceFW/fineweb", config="sample-10BT", streaming=True),
    "HuggingFaceFW/fineweb-edu": RegistryEntry("text", "HuggingFaceFW/fineweb-edu", config="sample-10BT", streaming=True),
    "HuggingFaceTB/smol-smoltalk": RegistryEntry("chat", "HuggingFaceTB/smol-smoltalk"),
    "HuggingFaceTB/everyday-conversations-llama3.1-2k": RegistryEntry(
        "chat", "HuggingFaceTB/everyday-conversations-llama3.1-2k", split="train_sft"
    ),
    "nvidia/Nemotron-Instruction-Following-Chat-v1": RegistryEntry(
        "chat", "nvidia/Nemotron-Instruction-Following-Chat-v1", split="chat_if", drop_reasoning=True
    ),
}
ALIASES = {
    "tinystories": "roneneldan/TinyStories",
    "fineweb": "HuggingFaceFW/fineweb",
    "fineweb-edu": "HuggingFaceFW/fineweb-edu",
    "smol-smoltalk": "HuggingFaceTB/smol-smoltalk",
    "everyday-conversations": "HuggingFaceTB/everyday-conversations-llama3.1-2k",
    "nemotron-if-chat": "nvidia/Nemotron-Instruction-Following-Chat-v1",
}


class DataValidationError(ValueError):
    """Invalid rows in a source whose on_invalid is `error`; the message names file, row and field."""


@dataclass(frozen=True)
class Failure:
    """One invalid row: where it is (`line` for files with lines), what is wrong with it, and the
    reason `code` it is counted under (`invalid_utf8`, `unknown_role`, ...)."""

    source: str
    row: int
    field: str
    reason: str
    code: str
    file: str | None = None
    value: str = ""
    line: int | None = None

    @property
    def where(self) -> str:
        return self.file or self.source

    def describe(self) -> str:
        at = f"line {self.line}" if self.line is not None else f"row {self.row}"
        fld = "" if self.field == "<row>" else f"field {self.field!r}: "
        return f"{self.where}: {at}: {fld}{self.reason}" + (f" ({self.value})" if self.value else "")


@dataclass
class Resolved:
    """A SourceSpec with the registry defaults applied."""

    spec: SourceSpec
    label: str
    kind: Kind | None
    origin: Literal["builtin", "hub", "local"]
    hub_id: str | None = None
    config: str | None = None
    split: str = "train"
    streaming: bool = False
    text_field: str = "text"
    messages_field: str = "messages"
    drop_reasoning: bool = False
    on_invalid: Literal["error", "drop"] = "drop"
    builtin: str | None = None
    files: list[str] = field(default_factory=list)


def resolve(spec: SourceSpec) -> Resolved:
    """Apply registry defaults; a local path is expanded to its files (or a save_to_disk folder)."""
    name = ALIASES.get(spec.name, spec.name)
    if name in REGISTRY:
        entry = REGISTRY[name]
        origin: Literal["builtin", "hub", "local"] = "builtin" if entry.builtin else "hub"
    elif is_local(spec.name):
        entry, origin = RegistryEntry("text"), "local"
    else:  # any other Hub dataset id, with the mapping given in the spec
        entry, origin = RegistryEntry("text", hub_id=name), "hub"
    res = Resolved(
        spec=spec,
        label=spec.name if origin == "local" else name,
        kind=entry.kind if origin != "local" else None,
        origin=origin,
        hub_id=entry.hub_id,
        config=spec.config if spec.config is not None else entry.config,
        split=spec.split or entry.split,
        streaming=spec.streaming if spec.streaming is not None else entry.streaming,
        text_field=spec.text_field or entry.text_field,
        messages_field=spec.messages_field or entry.messages_field,
        drop_reasoning=spec.drop_reasoning if spec.drop_reasoning is not None else entry.drop_reasoning,
        on_invalid=spec.on_invalid or ("error" if origin == "local" else "drop"),
        builtin=entry.builtin,
    )
    if name not in REGISTRY and origin == "hub" and spec.messages_field:
        res.kind = "chat"
    if origin == "local":
        res.files = local_paths(spec.name)
    return res


# ---------------------------------------------------------------------------------------------
# held-out split


def is_heldout(label: str, key: str, seed: int, fraction: float) -> bool:
    """Seeded, stable assignment of a row to the validation split (same in every stage)."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}|{label}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# ---------------------------------------------------------------------------------------------
# raw rows


def _quiet_datasets() -> None:
    import datasets

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    datasets.disable_progress_bars()


def _hub_rows(res: Resolved) -> Iterator[dict]:
    require_hub("dataset", res.hub_id or res.label)
    _quiet_datasets()
    import datasets

    try:
        ds = datasets.load_dataset(res.hub_id, res.config, split=res.split, streaming=res.streaming)
    except (OSError, ConnectionError) as err:
        if "offline" in str(err).lower() or "connect" in str(err).lower():
            raise RuntimeError(hub_error_message("dataset", res.hub_id or res.label)) from None
        raise
    yield from ds


# ---------------------------------------------------------------------------------------------
# validation and normalisation

_THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def validate_conversation(
    raw: Any, res: Resolved, row: int, file: str | None = None, require_assistant: bool = True, line: int | None = None
) -> tuple[list[dict[str, str]] | None, list[Failure]]:
    """Normalised `[{"role", "content"}]` (roles mapped, reasoning dropped) or the failures.
    `require_assistant=False` accepts chats without an assistant turn (pretraining text)."""

    def fail(fld: str, reason: str, code: str, value: Any = "") -> Failure:
        text = value if isinstance(value, str) else repr(value)
        return Failure(res.label, row, fld, reason, code, file, text[:80], line)

    if isinstance(raw, BadRow):
        return None, [fail(raw.field, raw.reason, raw.code)]
    fld = res.messages_field
    messages = raw.get(fld) if isinstance(raw, dict) else None
    if not isinstance(messages, list) or not messages:
        return None, [fail(fld, "missing or empty message list", "missing_messages", messages)]
    out: list[dict[str, str]] = []
    failures: list[Failure] = []
    key_role, key_content = res.spec.role_key, res.spec.content_key
    for i, msg in enumerate(messages):
        where = f"{fld}[{i}]"
        if not isinstance(msg, dict):
            failures.append(fail(where, "message is not an object", "bad_message", msg))
            continue
        role = msg.get(key_role)
        role = res.spec.role_map.get(role, role) if isinstance(role, str) else role
        content = msg.get(key_content)
        if role not in ROLES:
            failures.append(fail(f"{where}.{key_role}", "unknown role", "unknown_role", role))
        if not isinstance(content, str):
            failures.append(fail(f"{where}.{key_content}", "non-string content", "non_string_content", content))
            continue
        if res.drop_reasoning and role == "assistant":
            content = _THINK.sub("", content)
        if not content.strip():
            failures.append(fail(f"{where}.{key_content}", "empty content", "empty_content", content))
            continue
        out.append({"role": role, "content": content})
    if require_assistant and not failures and not any(m["role"] == "assistant" for m in out):
        failures.append(fail(fld, "no assistant turn", "no_assistant_turn"))
    return (None, failures) if failures else (out, [])


def render_chat_text(messages: list[dict[str, str]]) -> str:
    """A conversation as plain pretraining text: `user: ...` / `assistant: ...` lines."""
    return "\n".join(f"{m['role']}: {m['content'].strip()}" for m in messages)


@dataclass
class LoadStats:
    """What a source produced: rows read (in all and per file, or per source when it has no
    files), kept, and the failures of the dropped rows, each row counted once under the reason
    of its first failure."""

    rows: int = 0
    kept: int = 0
    failures: list[Failure] = field(default_factory=list)
    read: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, Counter] = field(default_factory=dict)

    def count(self, where: str) -> None:
        """One row read from `where` (a file or the source label)."""
        self.rows += 1
        self.read[where] = self.read.get(where, 0) + 1

    def drop(self, failures: list[Failure]) -> None:
        """One row dropped for these failures."""
        self.failures.extend(failures)
        self.dropped.setdefault(failures[0].where, Counter())[failures[0].code] += 1

    def summary(self) -> str:
        """`a.jsonl: 120 read, 20 dropped (missing_messages: 15, invalid_utf8: 5); b.jsonl: 0 read`."""
        parts = []
        for where, n in self.read.items():
            reasons = self.dropped.get(where)
            part = f"{where}: {n} read"
            if reasons:
                part += f", {sum(reasons.values())} dropped ({', '.join(f'{c}: {k}' for c, k in reasons.most_common())})"
            parts.append(part)
        return "; ".join(parts)


def _rows(res: Resolved, stats: LoadStats) -> Iterator[tuple[str | None, int, int | None, str, Any]]:
    """(file, row, line, split key, raw row) of a non-skills source, up to max_items rows, each
    counted in `stats` (every file of a local source is listed there, also one with no rows)."""
    if res.builtin == "chitchat":
        rows: Iterator[tuple[str | None, int, int | None, str, Any]] = (
            (None, c["row"], None, c["id"], c) for c in chitchat.iter_conversations()
        )
    elif res.origin == "hub":
        rows = ((None, i, None, str(i), r) for i, r in enumerate(_hub_rows(res)))
    else:
        stats.read.update({f: 0 for f in res.files if f not in stats.read})
        rows = ((f, i, line, f"{f}:{i}", r) for f, i, line, r in local_rows(res.files, res.split, res.spec.txt_unit))
    for n, item in enumerate(rows):
        if res.spec.max_items is not None and n >= res.spec.max_items:
            return
        stats.count(item[0] or res.label)
        yield item


def iter_chat_routed(
    res: Resolved, cfg: DataConfig, stats: LoadStats, require_assistant: bool = True
) -> Iterator[tuple[str, dict]]:
    """(split, conversation) for every valid conversation, split being "train" or "validation"
    (the skills source gives its own train and validation items, never test). Conversations are
    `{"messages", "skill", "row"}`; invalid rows go to `stats.failures`."""
    if res.builtin == "skills":
        for split in ("train", "validation"):
            for conv in skills.iter_skill_conversations(cfg.skills, split):
                stats.count(res.label)
                stats.kept += 1
                yield split, conv
        return
    if res.builtin == "world":
        for row, pair in enumerate(world.sft_pairs(cfg.world)):
            stats.count(res.label)
            stats.kept += 1
            split = "validation" if is_heldout(res.label, pair.question + pair.answer, cfg.seed, cfg.validation_fraction) else "train"
            messages = [{"role": "user", "content": pair.question}, {"role": "assistant", "content": pair.answer}]
            yield split, {"messages": messages, "skill": pair.attribute, "row": row}
        return
    for file, row, line, key, raw in _rows(res, stats):
        messages, failures = validate_conversation(raw, res, row, file, require_assistant, line)
        if failures:
            stats.drop(failures)
            continue
        stats.kept += 1
        split = "validation" if is_heldout(res.label, key, cfg.seed, cfg.validation_fraction) else "train"
        yield split, {"messages": messages, "skill": "", "row": row}


def iter_text_routed(res: Resolved, cfg: DataConfig, stats: LoadStats) -> Iterator[tuple[str, str]]:
    """(split, document); chat rows (a messages field and no text field) are rendered with
    `render_chat_text`. The world source gives its biographies (all of them train: every person's
    facts must be read) and one unseen biography per person as validation."""
    if res.builtin == "world":
        for split, docs in (("train", world.pretraining_text(cfg.world)), ("validation", world.validation_biographies(cfg.world))):
            for doc in docs:
                stats.count(res.label)
                stats.kept += 1
                yield split, doc
        return
    if res.builtin is not None:
        for split, conv in iter_chat_routed(res, cfg, stats, require_assistant=False):
            yield split, render_chat_text(conv["messages"])
        return
    for file, row, line, key, raw in _rows(res, stats):
        if isinstance(raw, BadRow) or (isinstance(raw, dict) and res.messages_field in raw and res.text_field not in raw):
            messages, failures = validate_conversation(raw, res, row, file, require_assistant=False, line=line)
            if failures:
                stats.drop(failures)
                continue
            text: Any = render_chat_text(messages or [])
        else:
            text = raw.get(res.text_field) if isinstance(raw, dict) else None
            if not isinstance(text, str) or not text.strip():
                reason, code = ("empty text", "empty_text") if isinstance(text, str) else \
                    (f"missing or non-string field {res.text_field!r}", "missing_text")
                stats.drop([Failure(res.label, row, res.text_field, reason, code, file, line=line)])
                continue
        stats.kept += 1
        yield ("validation" if is_heldout(res.label, key, cfg.seed, cfg.validation_fraction) else "train"), text


def iter_chat(res: Resolved, cfg: DataConfig, split: str, stats: LoadStats) -> Iterator[dict]:
    """Valid conversations of one split ("train" or "validation"; "test" only for skills)."""
    if res.builtin == "skills" and split == "test":
        for conv in skills.iter_skill_conversations(cfg.skills, "test"):
            stats.count(res.label)
            stats.kept += 1
            yield conv
        return
    for sp, conv in iter_chat_routed(res, cfg, stats):
        if sp == split:
            yield conv


def iter_text(res: Resolved, cfg: DataConfig, split: str, stats: LoadStats) -> Iterator[str]:
    """Documents of one split ("train" or "validation")."""
    for sp, text in iter_text_routed(res, cfg, stats):
        if sp == split:
            yield text


def raise_on_errors(res: Resolved, stats: LoadStats, limit: int = 20) -> None:
    """Raise DataValidationError when the source's on_invalid is `error` and a row was invalid:
    the first line names the first failure (file, line or row, field, problem) and the counts per
    reason; the next lines list further failures."""
    if res.on_invalid != "error" or not stats.failures:
        return
    first, *rest = [f.describe() for f in stats.failures[:limit]]
    if len(stats.failures) == 1:
        raise DataValidationError(f"{first}; set on_invalid: drop to skip and count invalid rows")
    reasons = sum(stats.dropped.values(), Counter())
    n = sum(reasons.values())
    source = "this source" if res.files == [res.label] else f"source {res.label!r}"
    counts = ", ".join(f"{c}: {k}" for c, k in reasons.most_common())
    more = len(stats.failures) - limit
    raise DataValidationError(
        f"{first}; {n} invalid row{'s' * (n != 1)} in {source} ({counts}); set on_invalid: drop to skip and count them"
        + "".join(f"\n  {line}" for line in rest)
        + (f"\n  ... and {more} more" if more > 0 else "")
    )


def describe_registry() -> str:
    lines = [f"{name:52s} {e.kind:5s} {e.description or (e.hub_id or '')}" for name, e in REGISTRY.items()]
    lines += [f"{alias:52s} -> {target}" for alias, target in ALIASES.items()]
    return "\n".join(lines)
