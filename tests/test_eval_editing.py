"""The editing metric: exact counting on an oracle model, determinism, clean padding, the suite."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import torch

from dgpt_core.config.evaluation import EvalConfig
from eval.editing import CLEAN, CONTEXT, INSERT, corrupt_example, editing_metrics
from eval.suite import run_eval
from tests.test_eval_suite import sft_folder  # noqa: F401 - fixture
from tests.tiny_models import IDS, tiny_modernbert

VOCAB = 64
A, B, C, R, S = 20, 21, 22, 30, 31
PROMPT = [10, 11]
PADDING = [IDS.eos, IDS.eos]


class _OneHotBackbone(torch.nn.Module):
    def __init__(self, predict):
        super().__init__()
        self.predict = predict

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(self.predict(input_ids), VOCAB).float())


class Oracle(torch.nn.Module):
    """A model whose argmax is the input token, except: `fixes` maps a visible id to another
    prediction, ids in `flags` and (with `duplicates`) a non-padding token equal to the next one are
    predicted <|delete|>. Shaped like ModernBertForMaskedLM for `logits_at`."""

    def __init__(self, fixes: dict[int, int] | None = None, flags: tuple[int, ...] = (), duplicates: bool = False):
        super().__init__()
        self.fixes, self.flags, self.duplicates = fixes or {}, flags, duplicates
        self.model = _OneHotBackbone(self._predict)
        self.head = torch.nn.Identity()
        self.decoder = torch.nn.Identity()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def _predict(self, ids: torch.Tensor) -> torch.Tensor:
        pred = ids.clone()
        for seen, fixed in self.fixes.items():
            pred[ids == seen] = fixed
        flagged = torch.isin(ids, torch.tensor(self.flags, dtype=torch.long))
        if self.duplicates:
            repeat = (ids[:, :-1] == ids[:, 1:]) & ~torch.isin(ids[:, :-1], torch.tensor([IDS.eos, IDS.pad]))
            flagged[:, :-1] |= repeat
        return torch.where(flagged, IDS.delete, pred)


def example(answer: list[int]) -> tuple[list[int], list[int]]:
    """Prompt, answer closed by <|im_end|>, two end-of-text pads; eligible = answer and pads."""
    ids = PROMPT + answer + [IDS.im_end] + PADDING
    return ids, [0] * len(PROMPT) + [1] * (len(answer) + 1 + len(PADDING))


def score(model, examples, *, pool, swap=0.0, insert=0.0, seed=0, batch_size=4, max_len=64):
    return editing_metrics(model, examples, mask_id=IDS.mask, delete_id=IDS.delete, pad_id=IDS.pad,
                           im_end_id=IDS.im_end, replacement_ids=pool, swap_prob=swap, insert_prob=insert,
                           seed=seed, batch_size=batch_size, max_len=max_len)


def test_swaps_counted_exactly():
    got = score(Oracle(fixes={R: A}), [example([A, A, A])], pool=[R], swap=1.0)
    assert (got["swaps"], got["inserts"], got["clean"], got["examples"]) == (4, 0, 2, 1)
    assert got["swap_fix_rate"] == 0.75  # the three A fixed, the swapped <|im_end|> is not
    assert got["false_edit_rate"] == 0.0
    assert math.isnan(got["delete_recall"]) and math.isnan(got["delete_precision"])


def test_false_edits_counted_on_answer_and_padding():
    got = score(Oracle(fixes={A: B}), [example([A, A, A])], pool=[R])
    assert (got["swaps"], got["inserts"], got["clean"]) == (0, 0, 6)
    assert got["false_edit_rate"] == 0.5 and math.isnan(got["swap_fix_rate"])
    pads_wrong = score(Oracle(fixes={IDS.eos: IDS.pad}), [example([A, B])], pool=[R])
    assert pads_wrong["false_edit_rate"] == 2 / 5


def test_insertions_counted_exactly():
    oracle = Oracle(flags=(S,), duplicates=True)  # flags random insertions (always S) and copies alike
    got = score(oracle, [example([A, B, C])], pool=[S], insert=1.0)
    assert (got["swaps"], got["inserts"], got["clean"]) == (0, 4, 6)
    assert got["delete_recall"] == 1.0 and got["delete_precision"] == 1.0 and got["false_edit_rate"] == 0.0
    wrong = score(oracle, [example([A, S, C])], pool=[S], insert=1.0)  # the answer's own S is flagged too
    assert wrong["delete_recall"] == 1.0 and wrong["delete_precision"] == 4 / 5
    assert wrong["false_edit_rate"] == 1 / 6


def test_insertions_push_out_trailing_padding():
    ids, _ = example([A, B, C])
    cut = score(Oracle(flags=(S,), duplicates=True), [example([A, B, C])], pool=[S], insert=1.0,
                max_len=len(ids) + 4 - 1)
    assert (cut["inserts"], cut["clean"]) == (4, 5)
    none_left = score(Oracle(), [example([A, B, C])], pool=[S], insert=1.0, max_len=len(ids) + 2)
    assert (none_left["inserts"], none_left["clean"]) == (4, 4)


def test_padding_and_prompt_never_corrupted():
    ids, mask = example([A, B, C])
    for seed in range(5):
        row = corrupt_example(ids, mask, generator=torch.Generator().manual_seed(seed), delete_id=IDS.delete,
                              im_end_id=IDS.im_end, replacement_ids=[R, S], swap_prob=1.0, insert_prob=1.0,
                              max_len=64)
        assert row.ids[: len(PROMPT)] == PROMPT and row.roles[: len(PROMPT)] == [CONTEXT] * len(PROMPT)
        assert row.ids[-len(PADDING):] == PADDING and row.roles[-len(PADDING):] == [CLEAN] * len(PADDING)
        assert row.roles.count(INSERT) == 4 and len(row.ids) == len(ids) + 4
        assert all(t == IDS.delete for t, r in zip(row.targets, row.roles) if r == INSERT)
    full = score(Oracle(), [example([A, B, C])] * 3, pool=[R, S], swap=1.0, insert=1.0)
    assert full["clean"] == 3 * len(PADDING)


def test_deterministic_and_independent_of_batching():
    model = tiny_modernbert()
    gen = torch.Generator().manual_seed(1)
    examples = [example(torch.randint(10, VOCAB, (n,), generator=gen).tolist()) for n in (3, 7, 5, 9, 4)]
    pool = list(range(10, VOCAB))
    first = score(model, examples, pool=pool, swap=0.3, insert=0.3, seed=7, batch_size=2)
    again = score(model, examples, pool=pool, swap=0.3, insert=0.3, seed=7, batch_size=5)
    assert json.dumps(first) == json.dumps(again)
    other = score(model, examples, pool=pool, swap=0.3, insert=0.3, seed=8, batch_size=2)
    assert (other["swaps"], other["inserts"]) != (first["swaps"], first["inserts"])


def test_run_eval_editing(tmp_path, sft_folder):  # noqa: F811
    cfg = EvalConfig(tasks=["editing"], edit_examples=6, limit=1, plots=False)
    metrics = run_eval(sft_folder, tmp_path / "eval", cfg)
    assert set(metrics["editing"]) == {
        "swap_fix_rate", "delete_recall", "delete_precision", "false_edit_rate", "swaps", "inserts", "clean",
        "swap_prob", "insert_prob", "seed", "examples", "dataset",
    }
    assert metrics["editing"]["examples"] == 6  # edit_examples, not capped by limit
    assert "editing" in metrics["meta"]["seconds"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Editing" in report and "insertions flagged (predicted <\\|delete\\|>) |" in report
    pretrain = run_eval(sft_folder, tmp_path / "eval_pt", cfg.model_copy(update={"model_kind": "pretrain"}))
    assert "editing" not in pretrain and any("editing" in n for n in pretrain["meta"]["notes"])
