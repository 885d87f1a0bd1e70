"""Pretraining text replayed during SFT (`dgpt_core.data.replay`): how many rows, scored where,
found where, and rejected where it makes no sense."""

import datasets
import pytest

from dgpt_core.config import load_run_config
from dgpt_core.data.replay import REPLAY_SOURCE, pretrain_split_beside, replay_count, with_replay
from dgpt_core.training.stage import training_rows


def sft_rows(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * n, "eligible_mask": [[0, 0, 1, 1]] * n,
                                       "source": ["world"] * n, "skill": ["qa"] * n})


def pretrain_rows(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": [[10 + i] * (3 + i) for i in range(n)]})


def test_the_replayed_share_is_the_fraction_asked_for_and_every_replayed_token_is_scored():
    mixed = with_replay(sft_rows(30), pretrain_rows(4), 0.25, seed=0)
    replayed = [row for row in mixed if row["source"] == REPLAY_SOURCE]
    assert len(mixed) == 40 and len(replayed) == 10
    assert all(row["eligible_mask"] == [1] * len(row["input_ids"]) and row["skill"] == "" for row in replayed)
    # 10 rows from 4: every pretraining row is used before any is used a third time
    counts = sorted([r["input_ids"][0] for r in replayed].count(10 + i) for i in range(4))
    assert counts == [2, 2, 3, 3]
    assert [row for row in mixed if row["source"] != REPLAY_SOURCE] == list(sft_rows(30))


def test_pieces_keep_every_token_in_order_and_are_replayed_as_rows():
    from dgpt_core.data.replay import pieces

    rows = [list(range(10)), list(range(100, 103))]
    assert pieces(rows, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [100, 101, 102]]
    assert pieces(rows, None) == rows
    mixed = with_replay(sft_rows(3), datasets.Dataset.from_dict({"input_ids": [list(range(10, 30))]}), 0.5, 0,
                        tokens=8)
    assert [r["input_ids"] for r in mixed if r["source"] == REPLAY_SOURCE] == [list(range(10, 18)),
                                                                                 list(range(18, 26)),
                                                                                 list(range(26, 30))]


def test_no_replay_returns_the_sft_rows_and_a_fraction_of_one_is_refused():
    rows = sft_rows(5)
    assert with_replay(rows, pretrain_rows(2), 0.0, seed=0) is rows
    assert replay_count(3, 0.5) == 3
    with pytest.raises(ValueError, match="replay fraction"):
        replay_count(3, 1.0)


def test_the_sft_stage_reads_the_pretraining_split_beside_its_own_and_says_when_there_is_none(tmp_path):
    data = tmp_path / "data-stage"
    datasets.DatasetDict({"train": sft_rows(6)}).save_to_disk(str(data / "sft"))
    cfg = load_run_config("ci", ["sft.pretrain_replay=0.5"]).sft
    with pytest.raises(FileNotFoundError, match="data-stage/pretrain is not a saved dataset"):
        training_rows(cfg, "sft", datasets.load_from_disk(str(data / "sft")), data / "sft")
    datasets.DatasetDict({"train": pretrain_rows(3)}).save_to_disk(str(data / "pretrain"))
    assert pretrain_split_beside(data / "sft") == data / "pretrain"
    mixed = training_rows(cfg, "sft", datasets.load_from_disk(str(data / "sft")), data / "sft")
    assert mixed["source"].count(REPLAY_SOURCE) == 6


def test_only_sft_replays():
    with pytest.raises(Exception, match="pretrain.pretrain_replay must be 0"):
        load_run_config("ci", ["pretrain.pretrain_replay=0.1"])
