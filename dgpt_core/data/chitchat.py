"""The PyPI package `chitchat-dataset` (MIT): ~7,000 human small-talk conversations, offline.

Each conversation is a list of speaker turns (consecutive messages of one sender); the first
speaker becomes `user`, the second `assistant`, alternating. Utterances of one turn are joined
with newlines. Conversations keep their id so the held-out split is stable across stages.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path


def dataset_path() -> Path:
    try:
        import chitchat_dataset
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise RuntimeError(
            "the embedded chat data needs the PyPI package `chitchat-dataset` (pip install chitchat-dataset)"
        ) from err
    return Path(chitchat_dataset.__file__).parent / "dataset.json"


@cache
def _raw() -> dict:
    return json.loads(dataset_path().read_text(encoding="utf-8"))


def to_messages(conversation: dict, utterance_sep: str = "\n") -> list[dict[str, str]]:
    """Speaker turns -> alternating user/assistant messages (same-sender turns are merged)."""
    turns: list[tuple[str, list[str]]] = []
    for group in conversation["messages"]:
        texts = [u["text"].strip() for u in group if isinstance(u.get("text"), str) and u["text"].strip()]
        if not texts:
            continue
        sender = group[0].get("sender", "")
        if turns and turns[-1][0] == sender:
            turns[-1][1].extend(texts)
        else:
            turns.append((sender, texts))
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": utterance_sep.join(texts)} for i, (_, texts) in enumerate(turns)]


def iter_conversations(max_items: int | None = None) -> Iterator[dict]:
    """Rows `{"id", "row", "messages"}` in the package's (stable) order."""
    for row, (cid, conversation) in enumerate(_raw().items()):
        if max_items is not None and row >= max_items:
            return
        yield {"id": cid, "row": row, "messages": to_messages(conversation)}


def num_conversations() -> int:
    return len(_raw())
