"""SFT example construction: assistant-only masks, answer padding, truncation, token copying."""

from __future__ import annotations

import itertools

import pytest

from dgpt_core.config import SFTDataConfig, SkillsConfig
from dgpt_core.data.sft import (
    SFTSettings,
    count_statuses,
    eligible_text,
    prepare_messages,
    render_example,
    split_conversation,
    tokenize_batch,
)
from dgpt_core.data.skills import generate_skills
from dgpt_core.data.sources import render_chat_text
from dgpt_core.models.tokenizer import EOS, IM_END, PAD, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tok():
    items = generate_skills(SkillsConfig(train_per_skill=150, validation_per_skill=0, test_per_skill=0), "train")
    texts = [render_chat_text(it.messages) for it in items]
    texts += ["user: hello there how are you doing today\nassistant: I am fine thanks, and you?"] * 50
    return train_bpe_tokenizer(texts, 400)


def convo(n_turns: int, system: bool = False) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "You are terse."}] if system else []
    for i in range(n_turns):
        msgs.append({"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"})
        msgs.append({"role": "assistant", "content": f"The answer is {2 * i}, friend {i}."})
    return msgs


def build(tok, messages, **cfg):
    cfg.setdefault("answer_canvas", 24)
    max_seq_len = cfg.pop("max_seq_len", 128)
    settings = SFTSettings.build(SFTDataConfig(**cfg), max_seq_len, tok)
    msgs = prepare_messages(messages, settings.assistant_leading_space)
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return split_conversation([m["role"] for m in msgs], list(enc["input_ids"]), list(enc["assistant_masks"]), settings)


@pytest.mark.parametrize("n_turns", [1, 2, 5])
@pytest.mark.parametrize("padding", ["eos", "none"])
def test_mask_covers_exactly_the_final_answer(tok, n_turns, padding):
    msgs = convo(n_turns)
    recs = build(tok, msgs, answer_padding=padding, max_seq_len=512)
    assert len(recs) == n_turns  # one example per assistant turn
    for k, rec in enumerate(recs):
        assert rec["status"] == "ok"
        answer = " " + msgs[2 * k + 1]["content"]
        ids, mask = rec["input_ids"], rec["eligible_mask"]
        assert len(ids) == len(mask)
        text = eligible_text(tok, ids, mask)
        n_answer = rec["answer_tokens"]
        if padding == "eos":
            pad = max(0, 24 - n_answer)
            assert text == answer + IM_END + EOS * pad
            assert ids[-pad or len(ids):] == [tok.convert_tokens_to_ids(EOS)] * pad
        else:
            assert text == answer + IM_END
        # the mask is one contiguous run at the end of the example
        first = mask.index(1)
        assert all(mask[first:]) and not any(mask[:first])
        # earlier turns, including earlier answers, are context only
        prompt = tok.decode(ids[:first], skip_special_tokens=False)
        for j in range(k):
            assert msgs[2 * j + 1]["content"] in prompt
        assert PAD not in tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("system", [False, True])
def test_sliced_examples_equal_templating_the_shorter_chat(tok, system):
    msgs = prepare_messages(convo(3, system=system), True)
    recs = build(tok, msgs, answer_padding="none", max_seq_len=512)
    roles = [m["role"] for m in msgs]
    ends = [i for i, r in enumerate(roles) if r == "assistant"]
    for rec, end in zip(recs, ends):
        direct = tok.apply_chat_template(msgs[: end + 1], tokenize=True, return_dict=True)["input_ids"]
        direct = list(direct)
        assert direct[-1] != tok.convert_tokens_to_ids(IM_END)  # the template ends with "\n"
        assert rec["input_ids"] == direct[: len(rec["input_ids"])]
        assert rec["input_ids"][-1] == tok.convert_tokens_to_ids(IM_END)


def test_canvas_none_pads_to_sequence_end(tok):
    recs = build(tok, convo(1), answer_canvas=None, max_seq_len=64)
    assert len(recs[0]["input_ids"]) == 64
    assert recs[0]["input_ids"][-1] == tok.convert_tokens_to_ids(EOS)


@pytest.mark.parametrize("long_canvas", [None, 48])
def test_a_long_answer_is_padded_to_the_long_answer_canvas(tok, long_canvas):
    short = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "cat dog"}]
    long = [{"role": "user", "content": "Say more."}, {"role": "assistant", "content": " ".join(["cat dog"] * 12)}]
    eos = tok.convert_tokens_to_ids(EOS)
    for messages in (short, long):
        (rec,) = build(tok, messages, answer_canvas=8, long_answer_canvas=long_canvas)
        answer = sum(rec["eligible_mask"])
        pads = len(rec["input_ids"]) - len(list(itertools.dropwhile(lambda t: t == eos, reversed(rec["input_ids"]))))
        if messages is short:
            assert answer == 8, "a short answer fills the short canvas"
        elif long_canvas is None:
            assert pads == 0 and answer > 8, "without a long canvas a long answer is not padded"
        else:
            assert answer == long_canvas and pads > 0, "a long answer is padded to the long canvas"


def test_truncation_keeps_answer_and_system_drops_oldest_turns(tok):
    msgs = convo(6, system=True)
    recs = build(tok, msgs, max_seq_len=96)
    last = recs[-1]
    assert last["status"] == "ok"
    assert len(last["input_ids"]) <= 96
    assert last["dropped_turns"] > 0
    text = tok.decode(last["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are terse.")
    assert eligible_text(tok, last["input_ids"], last["eligible_mask"]).startswith(" " + msgs[-1]["content"] + IM_END)
    assert msgs[2]["content"] not in text  # the oldest user turn went first
    assert msgs[-2]["content"] in text  # the question being answered stays


def test_long_answer_truncated_or_dropped_and_counted(tok):
    long = [{"role": "user", "content": "Say a lot."}, {"role": "assistant", "content": " ".join(["cat dog"] * 80)}]
    dropped = build(tok, long, max_seq_len=64, long_answer="drop")
    assert dropped[0]["status"] == "dropped_long_answer"
    cut = build(tok, long, max_seq_len=64, long_answer="truncate", max_answer_tokens=20)
    assert cut[0]["status"] == "ok" and cut[0]["truncated"] == 1
    assert cut[0]["answer_tokens"] == 20
    assert cut[0]["input_ids"][cut[0]["eligible_mask"].index(1) + 19] == tok.convert_tokens_to_ids(IM_END)
    prompt_too_long = build(tok, [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}],
                            max_seq_len=64)
    assert prompt_too_long[0]["status"] == "dropped_prompt_too_long"


def test_tokenize_batch_counts_every_assistant_turn(tok):
    import datasets

    convs = [convo(1), convo(2), convo(5)]
    ds = datasets.Dataset.from_dict({"messages": convs, "skill": ["", "", ""], "row": [0, 1, 2]})
    settings = SFTSettings.build(SFTDataConfig(), 128, tok)
    out = ds.map(tokenize_batch, batched=True, remove_columns=ds.column_names,
                 fn_kwargs={"tokenizer": tok, "settings": settings, "source": "unit"})
    counts = count_statuses(out)
    assert counts["assistant_turns"] == 8 == len(out)
    assert counts["status_ok"] == 8
    assert sorted(set(out["row"])) == [0, 1, 2]


def test_render_example_marks_answer(tok):
    msgs = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}]
    rec = build(tok, msgs)[0]
    shown = render_example(tok, rec["input_ids"], rec["eligible_mask"])
    assert shown == f"<|im_start|>user\nWhat is 2 plus 2?{IM_END}\n<|im_start|>assistant\n[[ 4{IM_END}{EOS}x21]]"


def test_prompt_word_and_number_have_same_ids_in_answer(tok):
    """A word or number copied from the prompt into the answer is the same token ids."""
    msgs = [{"role": "user", "content": "Repeat the words: cat dog 472"},
            {"role": "assistant", "content": "cat dog 472"}]
    rec = build(tok, msgs, answer_padding="none")[0]
    ids, mask = rec["input_ids"], rec["eligible_mask"]
    first = mask.index(1)
    prompt_ids, answer_ids = ids[:first], ids[first:-1]  # answer without <|im_end|>
    for piece in (" cat", " dog", " 472", "4", "7", "2"):
        piece_ids = tok(piece, add_special_tokens=False)["input_ids"]
        assert _contains(prompt_ids, piece_ids) and _contains(answer_ids, piece_ids), piece
    assert len(tok(" cat", add_special_tokens=False)["input_ids"]) == 1
    assert tok.tokenize(" 472") == ["Ġ", "4", "7", "2"]  # digits split individually


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("answer", ["35", "cat dog", "12 and 3"])
def test_prompt_part_equals_generation_prompt(tok, answer):
    """What precedes the eligible tokens is exactly what the sampler feeds at inference
    (chat template with add_generation_prompt), so train and inference see the same ids."""
    msgs = [{"role": "user", "content": "What is 12 plus 23?"}, {"role": "assistant", "content": answer}]
    rec = build(tok, msgs)[0]
    first = rec["eligible_mask"].index(1)
    gen = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert rec["input_ids"][:first] == list(gen)
    assert tok.decode(rec["input_ids"][first : first + rec["answer_tokens"] - 1]) == " " + answer
