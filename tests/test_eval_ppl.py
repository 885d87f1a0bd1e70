"""ELBO perplexity bound and the likelihood estimators: memorised vs random data, determinism,
hand-computed statistics, LLaDA's estimator, windows, and the greedy check against the sampler."""

from __future__ import annotations

import math

import pytest
import torch

from dgpt_core.config import ModelConfig
from dgpt_core.diffusion.elbo import Row, t_grid
from dgpt_core.diffusion.loss import token_nll
from dgpt_core.generation.sampler import SamplerConfig, TokenIds, generate
from dgpt_core.generation.schedules import get_schedule
from dgpt_core.models.backbone import build_model, logits_at
from dgpt_core.models.tokenizer import non_special_token_ids, special_token_ids
from eval.likelihood import greedy_matches, mc_nll, split_windows
from eval.ppl import answer_rows, ppl_bound, summarize, text_rows

LINEAR = get_schedule("linear")


@pytest.fixture(scope="module")
def memorised(tiny_tokenizer):
    """A tiny model trained on four random-token sequences until it has memorised them, the
    sequences, and four fresh random-token sequences."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64)
    model = build_model(cfg, tiny_tokenizer)
    mask = special_token_ids(tiny_tokenizer)["mask"]
    pool = torch.tensor(non_special_token_ids(tiny_tokenizer))
    gen = torch.Generator().manual_seed(1)
    data = pool[torch.randint(len(pool), (4, 16), generator=gen)]
    fresh = pool[torch.randint(len(pool), (4, 16), generator=gen)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(300):  # MDLM loss: mask rate t, weight 1/t
        x = data.repeat(4, 1)
        t = torch.rand(len(x), 1, generator=gen).clamp(min=0.05)
        m = torch.rand(x.shape, generator=gen) < t
        m[:, 0] |= ~m.any(1)
        logits = logits_at(model, x.masked_fill(m, mask), torch.ones_like(x), m)
        loss = (token_nll(logits, x[m], mask) * (1 / t).expand_as(x)[m]).sum() / x.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, data.tolist(), fresh.tolist()


def _bound(model, tok, seqs, **kw):
    ids = special_token_ids(tok)
    opts = {"t_points": 8, "mask_draws": 2, "seed": 0, "batch_size": 32, **kw}
    return ppl_bound(model, text_rows(seqs), mask_id=ids["mask"], pad_id=ids["pad"], schedule=LINEAR, **opts)


def test_memorised_bound_far_below_random_tokens(memorised, tiny_tokenizer):
    model, data, fresh = memorised
    seen, unseen = _bound(model, tiny_tokenizer, data), _bound(model, tiny_tokenizer, fresh)
    assert seen["n_tokens"] == unseen["n_tokens"] == 64
    assert seen["value"] < unseen["value"] / 20, (seen["value"], unseen["value"])
    assert seen["value"] < len(tiny_tokenizer) / 4  # well below a uniform guess


def test_bound_is_deterministic_and_batch_independent(memorised, tiny_tokenizer):
    model, data, fresh = memorised
    seqs = data + [s[:9] for s in fresh]  # different lengths: padding inside batches
    first = _bound(model, tiny_tokenizer, seqs)
    assert _bound(model, tiny_tokenizer, seqs) == first
    other_batches = _bound(model, tiny_tokenizer, seqs, batch_size=3)
    assert other_batches["nll_per_token"] == pytest.approx(first["nll_per_token"], rel=1e-5)
    shuffled = _bound(model, tiny_tokenizer, seqs[::-1])  # masks are seeded by row content
    assert shuffled["nll_per_token"] == pytest.approx(first["nll_per_token"], rel=1e-5)
    assert _bound(model, tiny_tokenizer, seqs, seed=1)["value"] != first["value"]
    for key in ("value", "stderr", "n_tokens", "dataset"):
        assert key in first


def test_summarize_hand_computed():
    s = summarize([2.0, 4.0], [1, 1])
    # ratio 3; residuals -1, +1; se = sqrt((1 + 1) * 2 / 1) / 2 = 1
    assert s["nll_per_token"] == pytest.approx(3.0)
    assert s["nll_stderr"] == pytest.approx(1.0)
    assert s["value"] == pytest.approx(math.exp(3.0))
    assert s["stderr"] == pytest.approx(math.exp(3.0))
    pooled = summarize([3.0, 3.0], [1, 2])  # 6 nats over 3 tokens
    assert pooled["nll_per_token"] == pytest.approx(2.0)


def test_t_grid_is_fixed_midpoints():
    grid = t_grid(4, 0.0)
    assert grid.tolist() == pytest.approx([0.125, 0.375, 0.625, 0.875])
    assert float(t_grid(16, 1e-3).min()) > 1e-3


def test_mc_estimate_of_one_token_is_exact(tiny_model, tiny_tokenizer):
    ids = special_token_ids(tiny_tokenizer)
    seq = tiny_tokenizer("the red cat sat on the mat .")["input_ids"]
    target = 4
    got = mc_nll(tiny_model, [Row(seq, [target])], [0], mask_id=ids["mask"], pad_id=ids["pad"], mc_num=8,
                 batch_size=32)[0]
    x = torch.tensor([seq])
    pos = torch.zeros_like(x, dtype=torch.bool)
    pos[0, target] = True
    with torch.no_grad():
        logits = logits_at(tiny_model, x.masked_fill(pos, ids["mask"]), torch.ones_like(x), pos)
        want = float(token_nll(logits, x[pos], ids["mask"]))
    assert got == pytest.approx(want, rel=1e-5)


def test_mc_estimate_averages_to_the_full_mask_expectation(tiny_model, tiny_tokenizer):
    """With l stratified over U{1..L}, the mean over many draws approaches the ELBO's value."""
    ids = special_token_ids(tiny_tokenizer)
    seq = tiny_tokenizer("the red cat sat on the mat .")["input_ids"]
    row = Row(seq, list(range(2, 6)))
    a = mc_nll(tiny_model, [row], [0], mask_id=ids["mask"], pad_id=ids["pad"], mc_num=64, batch_size=32)[0]
    b = mc_nll(tiny_model, [row], [1], mask_id=ids["mask"], pad_id=ids["pad"], mc_num=64, batch_size=32)[0]
    assert a == pytest.approx(b, rel=0.1)
    assert a > 0


def test_answer_rows_normalise_by_answer_tokens():
    im_end, eos = 7, 0
    ids = [10, 11, 12, 20, 21, im_end, eos, eos]
    mask = [0, 0, 0, 1, 1, 1, 1, 1]
    rows, counts = answer_rows([(ids, mask), ([1, 2], [0, 0])], im_end)
    assert len(rows) == 1 and rows[0].targets == [3, 4, 5, 6, 7]
    assert counts == [3]  # answer + <|im_end|>, not the padding


@pytest.mark.parametrize(("ctx_len", "cont_len", "max_len"), [(5, 3, 16), (20, 10, 16), (3, 40, 16), (0, 16, 16)])
def test_split_windows_score_every_token_once(ctx_len, cont_len, max_len):
    ctx, cont = list(range(100, 100 + ctx_len)), list(range(cont_len))
    windows = split_windows(ctx, cont, max_len)
    assert [t for _, piece in windows for t in piece] == cont
    full = ctx + cont
    for context, piece in windows:
        assert len(context) + len(piece) <= max_len
        joined = context + piece
        start = next(i for i in range(len(full)) if full[i : i + len(joined)] == joined)
        assert full[start : start + len(joined)] == joined  # a contiguous slice: context precedes
    if ctx_len + cont_len <= max_len:
        assert windows == [(ctx, cont)]


def test_greedy_check_agrees_with_the_sampler(tiny_model, tiny_tokenizer):
    ids = TokenIds.from_tokenizer(tiny_tokenizer)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ("the red cat", "2 plus 2 is", "the mat")]
    length = 5
    cfg = SamplerConfig(strategy="confidence", steps=length, max_new_tokens=length, temperature=0.0, seed=0,
                        stop_token_ids=())
    made = generate(tiny_model, prompts, ids, cfg)
    decoded = made.canvas[:, made.prompt_width :].tolist()
    never = [ids.mask, ids.pad, ids.im_start, ids.delete]
    common = {"mask_id": ids.mask, "pad_id": ids.pad, "never_ids": never, "max_len": 64, "batch_size": 32}
    assert greedy_matches(tiny_model, list(zip(prompts, decoded)), **common) == [True] * 3
    altered = [row[:-1] + [row[-1] + 1 if row[-1] + 1 != ids.mask else row[-1] + 2] for row in decoded]
    assert greedy_matches(tiny_model, list(zip(prompts, altered)), **common) == [False] * 3
