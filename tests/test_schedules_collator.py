"""Noise schedules, t sampling, and the collator's masking / edit / insertion corruption."""

import math

import pytest
import torch

from dgpt_core.config import DiffusionConfig
from dgpt_core.diffusion.collator import IGNORE_INDEX, DiffusionCollator, edit_state
from dgpt_core.generation.schedules import get_schedule, sample_t

MASK, PAD, DELETE = 2, 1, 5
SPECIALS = {0, 1, 2, 3, 4, 5}
VOCAB = 60


def make_collator(max_length=40, **cfg) -> DiffusionCollator:
    return DiffusionCollator(
        DiffusionConfig(**cfg),
        mask_id=MASK,
        pad_id=PAD,
        delete_id=DELETE,
        replacement_ids=range(6, VOCAB),
        max_length=max_length,
    )


@pytest.mark.parametrize("name", ["linear", "loglinear", "cosine"])
def test_schedule_endpoints_and_weight_is_elbo_weight(name):
    schedule = get_schedule(name, eps=1e-3)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    assert torch.isclose(schedule.alpha(torch.tensor(0.0)), torch.tensor(1.0))
    assert schedule.alpha(torch.tensor(1.0)) <= 1e-3 + 1e-9
    assert torch.all(schedule.alpha(t[1:]) < schedule.alpha(t[:-1])), "alpha must decrease"
    h = 1e-6
    d_alpha = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    expected = -d_alpha / (1 - schedule.alpha(t))
    assert torch.allclose(schedule.weight(t), expected, rtol=1e-4)


def test_linear_weight_is_one_over_t():
    t = torch.tensor([0.1, 0.5, 1.0])
    assert torch.allclose(get_schedule("linear").weight(t), 1 / t)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_schedule("quadratic")


def test_stratified_t_covers_the_interval_evenly_and_is_bounded():
    gen = torch.Generator().manual_seed(0)
    eps, n = 1e-3, 16
    t = sample_t(n, gen, eps, "stratified")
    assert t.min() >= eps and t.max() <= 1.0
    gaps = torch.diff(torch.sort(t).values)
    # one point in each of the n strata of width (1 - eps) / n
    assert torch.allclose(gaps, torch.full_like(gaps, (1 - eps) / n), atol=1e-5)
    assert (get_schedule("linear").weight(t) <= 1 / eps).all(), "the ELBO weight stays bounded"


def test_uniform_t_is_clamped():
    t = sample_t(10_000, torch.Generator().manual_seed(1), 0.05, "uniform")
    assert t.min() >= 0.05 and t.max() <= 1.0


def test_masking_rate_tracks_t():
    collator = make_collator(max_length=4000, edit_start=1.0)
    ids = torch.randint(6, VOCAB, (1, 4000)).repeat(5, 1)
    attention = torch.ones_like(ids, dtype=torch.bool)
    batch = collator.corrupt(ids, attention, attention, edit_state(collator.cfg, 0.0), torch.Generator().manual_seed(3))
    rate = batch["masked_positions"].float().mean(dim=1)
    expected = 1 - get_schedule("linear").alpha(batch["t"])
    # binomial std with n=4000 is at most 0.008
    assert torch.allclose(rate, expected, atol=0.03), (rate, expected)
    assert torch.all(batch["input_ids"][batch["masked_positions"]] == MASK)


def sft_features():
    """Two prompt/answer examples of different lengths: 1 marks the eligible answer tokens."""
    return [
        {"input_ids": list(range(10, 30)), "eligible_mask": [0] * 12 + [1] * 8},
        {"input_ids": list(range(30, 42)), "eligible_mask": [0] * 5 + [1] * 7},
    ]


@pytest.mark.parametrize("targets", ["visible", "corrupted"])
def test_nothing_outside_eligible_positions_is_touched(targets):
    collator = make_collator(edit_start=0.0, edit_prob=0.5, insert_prob=0.3, edit_loss_targets=targets)
    collator.set_progress(0.5)
    features = sft_features()
    for seed in range(30):
        collator.cfg.seed = seed
        batch = collator(features)
        for row, feature in enumerate(features):
            n_prompt = feature["eligible_mask"].index(1)
            assert batch["input_ids"][row, :n_prompt].tolist() == feature["input_ids"][:n_prompt]
            assert not batch["masked_positions"][row, :n_prompt].any()
            assert not batch["edit_positions"][row, :n_prompt].any()
            assert (batch["labels"][row, :n_prompt] == IGNORE_INDEX).all()
            real = batch["attention_mask"][row].bool()
            assert (batch["input_ids"][row, ~real] == PAD).all(), "padding must stay padding"
            assert (batch["labels"][row, ~real] == IGNORE_INDEX).all()


def test_labels_of_masked_swapped_and_inserted_positions():
    collator = make_collator(edit_start=0.0, edit_prob=0.4, insert_prob=0.2, edit_loss_targets="corrupted")
    collator.set_progress(0.5)
    features = [{"input_ids": list(range(6, 36))} for _ in range(8)]
    batch = collator(features)
    ids, labels = batch["input_ids"], batch["labels"]
    masked, edits = batch["masked_positions"], batch["edit_positions"]
    assert not (masked & edits).any()
    assert (ids[masked] == MASK).all()
    inserted = labels == DELETE
    assert inserted.any() and edits[inserted].all(), "every inserted token is scored by the edit loss"
    assert not (ids == DELETE).any(), "the <|delete|> token itself never enters the input"
    assert not any(int(tok) in SPECIALS for tok in ids[inserted]), "spurious tokens are ordinary tokens"
    swapped = edits & ~inserted
    assert swapped.any() and (ids[swapped] != labels[swapped]).all(), "a swap always changes the token"
    assert not any(int(tok) in SPECIALS for tok in ids[swapped]), "replacements are never special tokens"
    # removing the insertions gives back the original row (up to truncation at the end)
    for row in range(ids.shape[0]):
        kept = labels[row][(labels[row] != DELETE) & (labels[row] != IGNORE_INDEX)].tolist()
        assert kept == list(range(6, 6 + len(kept))), "insertion keeps the order and the first token"


def test_insertion_never_exceeds_max_length_and_keeps_first_token():
    collator = make_collator(max_length=30, edit_start=0.0, edit_prob=0.0, insert_prob=0.5)
    collator.set_progress(1.0)
    features = [{"input_ids": list(range(6, 36))} for _ in range(16)]  # already at max_length
    for seed in range(10):
        collator.cfg.seed = seed
        batch = collator(features)
        assert batch["input_ids"].shape[1] <= 30
        labels = batch["labels"]
        first_real = torch.where(labels == DELETE, IGNORE_INDEX, labels)
        for row in range(16):
            originals = first_real[row][first_real[row] != IGNORE_INDEX]
            assert originals[0] == 6, "the first real token is never dropped"
        assert not (batch["input_ids"] == DELETE).any()
        assert (batch["edit_positions"][labels == DELETE]).all(), "no spurious token without its label"


def test_spurious_tokens_copy_their_neighbour_or_are_random_ordinary_tokens():
    collator = make_collator(edit_start=0.0, edit_prob=0.0, insert_prob=0.3, insert_copy_prob=0.5)
    collator.set_progress(1.0)
    batch = collator([{"input_ids": list(range(6, 36))} for _ in range(32)])
    ids, labels = batch["input_ids"], batch["labels"]
    inserted = labels == DELETE
    following = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), PAD)], 1)
    copies = inserted & (ids == following)
    share = copies.sum().item() / inserted.sum().item()
    assert inserted.sum() > 100 and 0.35 < share < 0.65, share
    randoms = inserted & ~copies
    assert randoms.any() and not any(int(t) in SPECIALS for t in ids[randoms])
    all_copies = make_collator(edit_start=0.0, edit_prob=0.0, insert_prob=0.3, insert_copy_prob=1.0)
    all_copies.set_progress(1.0)
    batch = all_copies([{"input_ids": list(range(6, 36))} for _ in range(8)])
    inserted = batch["labels"] == DELETE
    following = torch.cat([batch["input_ids"][:, 1:], torch.full((8, 1), PAD)], 1)
    assert torch.equal(batch["input_ids"][inserted], following[inserted])


def test_edit_loss_targets_visible_scores_every_visible_eligible_token():
    collator = make_collator(edit_start=0.0, edit_prob=0.2, edit_loss_targets="visible")
    collator.set_progress(0.0)
    batch = collator(sft_features())
    eligible = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["edit_positions"], eligible & ~batch["masked_positions"])


def test_curriculum_switches_and_anneals():
    cfg = DiffusionConfig(edit_start=0.8, edit_prob=0.2, edit_prob_final=0.0, insert_prob=0.1)
    assert not edit_state(cfg, 0.79).active
    start, middle, end = edit_state(cfg, 0.8), edit_state(cfg, 0.9), edit_state(cfg, 1.0)
    assert start.active and math.isclose(start.edit_prob, 0.2)
    assert math.isclose(middle.edit_prob, 0.1, rel_tol=1e-6)
    assert math.isclose(end.edit_prob, 0.0, abs_tol=1e-9)
    assert middle.insert_prob == 0.1
    assert edit_state(DiffusionConfig(edit_start=0.0), 0.0).active
    assert not edit_state(DiffusionConfig(edit_start=1.0), 1.0).active

    collator = make_collator(edit_start=0.5, edit_prob=0.3)
    collator.set_progress(0.2)
    before = collator(sft_features())
    collator.set_progress(0.6)
    after = collator(sft_features())
    assert before["edit_active"] == 0 and not before["edit_positions"].any()
    assert after["edit_active"] == 1 and after["edit_positions"].any()


def test_collator_is_reproducible_and_seed_dependent():
    features = sft_features()
    a, b = make_collator(seed=1)(features), make_collator(seed=1)(features)
    c = make_collator(seed=2)(features)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["t"], c["t"])


def test_collator_gives_the_same_batches_in_dataloader_workers():
    features = [{"input_ids": list(range(6 + i, 26 + i))} for i in range(16)]
    collator = make_collator(edit_start=0.0, edit_prob=0.2, insert_prob=0.1)

    def batches(workers):
        loader = torch.utils.data.DataLoader(features, batch_size=4, collate_fn=collator, num_workers=workers)
        return [b["input_ids"] for b in loader]

    for main, worker in zip(batches(0), batches(2), strict=True):
        assert torch.equal(main, worker)


def test_progress_set_in_the_main_process_reaches_workers():
    features = [{"input_ids": list(range(6, 26))} for _ in range(8)]
    collator = make_collator(edit_start=0.5, edit_prob=0.5)
    loader = torch.utils.data.DataLoader(
        features, batch_size=4, collate_fn=collator, num_workers=1, persistent_workers=True
    )
    assert all(b["edit_active"] == 0 for b in loader)
    collator.set_progress(0.9)
    assert all(b["edit_active"] == 1 for b in loader)


def test_too_long_example_names_the_row():
    with pytest.raises(ValueError, match="example 1 .* 50 tokens"):
        make_collator(max_length=40)([{"input_ids": [7] * 10}, {"input_ids": [7] * 50}])


@pytest.mark.parametrize("name", ["linear", "loglinear", "cosine"])
def test_the_complement_time_masks_with_the_probability_the_first_time_keeps(name):
    schedule = get_schedule(name, eps=1e-3)
    t = torch.linspace(0.05, 0.95, 50, dtype=torch.float64)  # where the complement needs no clamping
    assert torch.allclose(schedule.mask_prob(schedule.complement(t)), schedule.alpha(t), atol=1e-6)


@pytest.mark.parametrize("block_size", [None, 4])
def test_complementary_twins_mask_disjoint_sets_that_cover_every_eligible_token(block_size):
    collator = make_collator(edit_start=1.0, complementary_masking=True, block_size=block_size)
    features = sft_features()
    batch = collator(features)
    width = max(len(f["input_ids"]) for f in features)
    masked = batch["masked_positions"][:, :width]  # the corrupted rows (a block batch appends clean copies)
    labels = batch["labels"][:, :width]
    n = len(features)
    assert masked.shape[0] == 2 * n
    eligible = labels[:n] != IGNORE_INDEX
    assert torch.equal(labels[:n], labels[n:])
    assert not (masked[:n] & masked[n:]).any() and torch.equal(masked[:n] | masked[n:], eligible)
    weights = batch["loss_weight"][:, :width]
    t_first, t_twin = 1.0 / weights[:n][masked[:n]], 1.0 / weights[n:][masked[n:]]
    assert t_first.numel() and t_twin.numel() and torch.all((t_first > 0) & (t_first <= 1))
    # each twin's time is the complement of its pair's (linear: 1 - t), position by position
    both = eligible & masked[:n] & ~masked[n:]
    first_t = 1.0 / weights[:n][both]
    twin_t = get_schedule("linear").complement(first_t)
    assert torch.allclose(1.0 / weights[n:][both], twin_t, atol=1e-5)


def test_uniform_loss_weighting_scores_every_masked_token_once():
    features = sft_features()
    elbo, uniform = make_collator(edit_start=1.0)(features), make_collator(edit_start=1.0, loss_weighting="uniform")(features)
    assert torch.equal(elbo["masked_positions"], uniform["masked_positions"])
    assert torch.all(uniform["loss_weight"][uniform["masked_positions"]] == 1.0)
    assert torch.all(elbo["loss_weight"][elbo["masked_positions"]] > 1.0)
