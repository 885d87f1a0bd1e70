"""Chat conversations -> SFT examples with assistant-only eligibility masks.

Every assistant turn of a conversation becomes one example: the chat up to and including that
answer. Only the final answer's tokens and its <|im_end|> are eligible for noise and loss; with
`answer_padding: eos` they are followed by <|endoftext|> tokens up to the answer canvas, which are
eligible too, so the model learns where an answer stops.

A conversation is tokenized once with the chat template (`return_assistant_tokens_mask`), then cut
at its <|im_start|> tokens: every message is one segment, and because the special tokens split the
text, an example made of segments has exactly the ids that templating the shorter chat would give
(a test checks this). Too long: the answer stays whole and the oldest context turns go first (a
leading system prompt is kept); an answer over the maximum is truncated or dropped per setting.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..config import SFTDataConfig
from ..models.tokenizer import special_token_ids

STATUSES = ("ok", "zero_answer_tokens", "dropped_long_answer", "dropped_prompt_too_long")
MIN_PROMPT_TOKENS = 8


@dataclass(frozen=True)
class SFTSettings:
    """What example construction needs, resolved from SFTDataConfig, max_seq_len and the tokenizer."""

    max_seq_len: int
    answer_padding: str
    answer_canvas: int | None
    long_answer_canvas: int | None
    max_answer_tokens: int | None
    long_answer: str
    assistant_leading_space: bool
    im_start: int
    im_end: int
    eos: int

    @classmethod
    def build(cls, cfg: SFTDataConfig, max_seq_len: int, tokenizer: PreTrainedTokenizerBase) -> SFTSettings:
        ids = special_token_ids(tokenizer)
        return cls(
            max_seq_len=max_seq_len,
            answer_padding=cfg.answer_padding,
            answer_canvas=cfg.answer_canvas,
            long_answer_canvas=cfg.long_answer_canvas,
            max_answer_tokens=cfg.max_answer_tokens,
            long_answer=cfg.long_answer,
            assistant_leading_space=cfg.assistant_leading_space,
            im_start=ids["im_start"],
            im_end=ids["im_end"],
            eos=ids["eos"],
        )


    def canvas_of(self, answer_tokens: int) -> int | None:
        """The canvas an answer of this many tokens (content + <|im_end|>) is padded to: the answer
        canvas; when it is longer, the long-answer canvas, or the answer itself (no padding) when
        none is set; None = the sequence end (no answer canvas)."""
        if self.answer_canvas and answer_tokens > self.answer_canvas:
            return self.long_answer_canvas or answer_tokens
        return self.answer_canvas


def prepare_messages(messages: list[dict[str, str]], leading_space: bool) -> list[dict[str, str]]:
    """Give assistant messages the leading space that words have in the prompt (idempotent)."""
    if not leading_space:
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    return [
        {
            "role": m["role"],
            "content": " " + m["content"] if m["role"] == "assistant" and not m["content"][:1].isspace() else m["content"],
        }
        for m in messages
    ]


def _segments(ids: list[int], im_start: int) -> tuple[list[int], list[tuple[int, int]]]:
    starts = [i for i, t in enumerate(ids) if t == im_start]
    bounds = [*starts, len(ids)]
    return ids[: starts[0]] if starts else ids, [(bounds[k], bounds[k + 1]) for k in range(len(starts))]


def split_conversation(
    roles: list[str], ids: list[int], assistant_mask: list[int], s: SFTSettings
) -> list[dict[str, Any]]:
    """One record per assistant turn: input_ids, eligible_mask, status, turn, counters."""
    preamble, segs = _segments(ids, s.im_start)
    if len(segs) != len(roles):
        raise ValueError(
            f"chat template produced {len(segs)} <|im_start|> segments for {len(roles)} messages; "
            "the SFT splitter needs one <|im_start|> per message (ChatML)"
        )
    L = s.max_seq_len
    has_system = bool(roles) and roles[0] == "system"
    system = ids[segs[0][0] : segs[0][1]] if has_system else []
    out: list[dict[str, Any]] = []
    for turn, role in enumerate(roles):
        if role != "assistant":
            continue
        rec: dict[str, Any] = {"turn": turn, "status": "ok", "truncated": 0, "dropped_turns": 0, "short_padding": 0}
        a, b = segs[turn]
        answer_pos = [p for p in range(a, b) if assistant_mask[p]]
        if not answer_pos:
            out.append({**rec, "status": "zero_answer_tokens", "input_ids": [], "eligible_mask": []})
            continue
        header = ids[a : answer_pos[0]]
        answer = ids[answer_pos[0] : answer_pos[-1] + 1]
        fixed = len(preamble) + (len(system) if turn > 0 else 0) + len(header)
        max_answer = s.max_answer_tokens or (L - fixed - MIN_PROMPT_TOKENS)
        max_answer = min(max_answer, L - fixed)
        if len(answer) > max_answer:
            if s.long_answer == "drop" or max_answer < 2:
                out.append({**rec, "status": "dropped_long_answer", "input_ids": [], "eligible_mask": []})
                continue
            answer = answer[: max_answer - 1] + [s.im_end]
            rec["truncated"] = 1
        canvas = s.canvas_of(len(answer))
        want_pad = (max(0, canvas - len(answer)) if canvas else L) if s.answer_padding == "eos" else 0
        room = L - fixed - len(answer)  # tokens left for context turns and padding
        reserve = want_pad if s.answer_padding == "eos" and canvas else 0
        first_ctx = 1 if has_system else 0
        context: list[list[int]] = []
        used = 0
        for j in range(turn - 1, first_ctx - 1, -1):
            seg = ids[segs[j][0] : segs[j][1]]
            # the nearest turn may eat into the padding; older turns only fit beside full padding
            if used + len(seg) > (room if not context else room - reserve):
                break
            context.append(seg)
            used += len(seg)
        if turn > first_ctx and not context:
            out.append({**rec, "status": "dropped_prompt_too_long", "input_ids": [], "eligible_mask": []})
            continue
        rec["dropped_turns"] = turn - first_ctx - len(context)
        prompt = list(preamble) + (list(system) if turn > 0 else [])
        for seg in reversed(context):
            prompt.extend(seg)
        prompt.extend(header)
        free = L - len(prompt) - len(answer)
        pad = (min(want_pad, free) if canvas else free) if s.answer_padding == "eos" else 0
        rec["short_padding"] = int(bool(canvas) and pad < want_pad)
        rec["input_ids"] = prompt + answer + [s.eos] * pad
        rec["eligible_mask"] = [0] * len(prompt) + [1] * (len(answer) + pad)
        rec["answer_tokens"] = len(answer)
        out.append(rec)
    return out


def tokenize_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, settings: SFTSettings, source: str
) -> dict[str, list]:
    """datasets.map function: a batch of conversations -> one row per assistant turn (all
    statuses; rows whose status is not `ok` are counted, then filtered out)."""
    convs = [prepare_messages(m, settings.assistant_leading_space) for m in batch["messages"]]
    enc = tokenizer.apply_chat_template(
        convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    cols: dict[str, list] = {k: [] for k in (
        "input_ids", "eligible_mask", "source", "skill", "status", "row", "turn",
        "truncated", "dropped_turns", "short_padding", "answer_tokens",
    )}
    for conv, ids, mask, skill, row in zip(
        convs, enc["input_ids"], enc["assistant_masks"], batch["skill"], batch["row"]
    ):
        for rec in split_conversation([m["role"] for m in conv], list(ids), list(mask), settings):
            cols["input_ids"].append(rec["input_ids"])
            cols["eligible_mask"].append(rec["eligible_mask"])
            cols["source"].append(source)
            cols["skill"].append(skill or "")
            cols["row"].append(row)
            for key in ("status", "turn", "truncated", "dropped_turns", "short_padding"):
                cols[key].append(rec[key])
            cols["answer_tokens"].append(rec.get("answer_tokens", 0))
    return cols


def count_statuses(ds) -> dict[str, int]:
    """Counters for the report and manifest from a tokenize_batch output dataset."""
    status = Counter(ds["status"])
    ok = [i for i, st in enumerate(ds["status"]) if st == "ok"]
    cols = ds.select_columns(["truncated", "dropped_turns", "short_padding"]).to_dict()
    return {
        "assistant_turns": len(ds),
        **{f"status_{k}": status.get(k, 0) for k in STATUSES},
        "truncated_answers": sum(cols["truncated"][i] for i in ok),
        "examples_with_dropped_context": sum(1 for i in ok if cols["dropped_turns"][i] > 0),
        "dropped_context_turns": sum(cols["dropped_turns"][i] for i in ok),
        "short_padding": sum(cols["short_padding"][i] for i in ok),
    }


# ---------------------------------------------------------------------------------------------
# inspection helpers


def eligible_text(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], eligible_mask: list[int]) -> str:
    """Decode only the eligible tokens (special tokens kept)."""
    return tokenizer.decode([t for t, m in zip(input_ids, eligible_mask) if m], skip_special_tokens=False)


def render_example(
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[int],
    eligible_mask: list[int],
    open_mark: str = "[[",
    close_mark: str = "]]",
) -> str:
    """The example as text with every eligible run wrapped in markers; runs of one repeated
    special token (the eos padding) are shown as `<|endoftext|>x12`."""
    parts: list[str] = []
    i = 0
    while i < len(input_ids):
        j = i
        while j < len(input_ids) and eligible_mask[j] == eligible_mask[i]:
            j += 1
        text = _compress(tokenizer, input_ids[i:j])
        parts.append(f"{open_mark}{text}{close_mark}" if eligible_mask[i] else text)
        i = j
    return "".join(parts)


def _compress(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    special = set(tokenizer.all_special_ids)
    out: list[str] = []
    i = 0
    while i < len(ids):
        if ids[i] in special:
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            token = tokenizer.convert_ids_to_tokens(ids[i])
            out.append(token if j - i == 1 else f"{token}x{j - i}")
            i = j
        else:
            j = i
            while j < len(ids) and ids[j] not in special:
                j += 1
            out.append(tokenizer.decode(ids[i:j]))
            i = j
    return "".join(out)
