"""Sources: local files, validation reports, Hub names offline, chitchat, held-out split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from dgpt_core import hub
from dgpt_core.config import DataConfig, SourceSpec
from dgpt_core.data import chitchat
from dgpt_core.data.sources import (
    DataValidationError,
    LoadStats,
    is_heldout,
    iter_chat_routed,
    iter_text_routed,
    raise_on_errors,
    resolve,
)

CFG = DataConfig(validation_fraction=0.0)


def chats(spec: SourceSpec, cfg: DataConfig = CFG):
    res, stats = resolve(spec), LoadStats()
    out = [c for _, c in iter_chat_routed(res, cfg, stats)]
    return res, stats, out


def texts(spec: SourceSpec, cfg: DataConfig = CFG):
    res, stats = resolve(spec), LoadStats()
    return res, stats, [t for _, t in iter_text_routed(res, cfg, stats)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_local_jsonl_parquet_txt_and_disk_load(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jl = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD])
    assert len(chats(SourceSpec(name=str(jl)))[2]) == 2
    pq.write_table(pa.table({"text": ["doc one", "doc two", "doc three"]}), tmp_path / "t.parquet")
    assert texts(SourceSpec(name=str(tmp_path / "t.parquet")))[2] == ["doc one", "doc two", "doc three"]
    (tmp_path / "a.txt").write_text("para one\nstill one\n\npara two\n")
    assert texts(SourceSpec(name=str(tmp_path / "a.txt")))[2] == ["para one\nstill one", "para two\n"]
    assert len(texts(SourceSpec(name=str(tmp_path / "a.txt"), txt_unit="line"))[2]) == 3
    write_jsonl(tmp_path / "docs.jsonl", [{"text": "x y"}, {"body": "z"}])
    _, stats, docs = texts(SourceSpec(name=str(tmp_path / "docs.jsonl"), on_invalid="drop"))
    assert docs == ["x y"] and stats.failures[0].row == 2
    datasets.Dataset.from_dict({"messages": [GOOD["messages"]] * 3}).save_to_disk(str(tmp_path / "disk"))
    assert len(chats(SourceSpec(name=str(tmp_path / "disk")))[2]) == 3
    # a glob over several files, and chat rows rendered as pretraining text
    assert len(chats(SourceSpec(name=str(tmp_path / "c*.jsonl")))[2]) == 2
    assert texts(SourceSpec(name=str(jl)))[2][0] == "user: hi\nassistant: hello"


BAD_ROWS = [
    GOOD,  # line 1
    {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},  # 2
    {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},  # 3
    {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},  # 4
    {"messages": [{"role": "user", "content": "only a question"}]},  # 5
    {"messages": []},  # 6
    {"conversation": []},  # 7
    GOOD,  # 8
]


def test_validation_failures_reported_with_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with (tmp_path / "bad.jsonl").open("a") as fh:
        fh.write("{not json\n")  # line 9
    res, stats, out = chats(SourceSpec(name=str(path), on_invalid="drop"))
    assert len(out) == 2 and stats.rows == 9
    got = {(f.row, f.field, f.reason) for f in stats.failures}
    assert got == {
        (2, "messages[0].role", "unknown role"),
        (3, "messages[0].content", "non-string content"),
        (4, "messages[0].content", "empty content"),
        (5, "messages", "no assistant turn"),
        (6, "messages", "missing or empty message list"),
        (7, "messages", "missing or empty message list"),
        (9, "<row>", "invalid JSON: Expecting property name enclosed in double quotes"),
    }
    assert all(f.file == str(path) for f in stats.failures)
    raise_on_errors(res, stats)  # drop: no error


def test_on_invalid_error_is_default_for_local_files(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS[:3])
    res, stats, _ = chats(SourceSpec(name=str(path)))
    assert res.on_invalid == "error"
    with pytest.raises(DataValidationError) as err:
        raise_on_errors(res, stats)
    msg = str(err.value)
    assert f"{path}: line 2: field 'messages[0].role': unknown role" in msg
    assert f"{path}: line 3: field 'messages[0].content': non-string content" in msg


def test_role_map_and_reasoning_dropped(tmp_path):
    row = {"conversations": [{"from": "human", "value": "q"},
                             {"from": "gpt", "value": "<think>hmm</think>answer", "reasoning_content": "r"}]}
    path = write_jsonl(tmp_path / "sg.jsonl", [row])
    spec = SourceSpec(name=str(path), messages_field="conversations", role_key="from", content_key="value",
                      role_map={"human": "user", "gpt": "assistant"}, drop_reasoning=True)
    assert chats(spec)[2][0]["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "answer"}]
    assert resolve(SourceSpec(name="nemotron-if-chat")).drop_reasoning is True


@pytest.mark.parametrize("name", ["roneneldan/TinyStories", "fineweb-edu", "smol-smoltalk", "someone/unknown-set"])
def test_hub_names_fail_fast_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    kind = "chat" if name == "smol-smoltalk" else "text"
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        (chats if kind == "chat" else texts)(SourceSpec(name=name))
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert resolve(SourceSpec(name=name)).hub_id in msg and "offline" in msg and "local path" in msg
    hub.hub_reachable.cache_clear()


def test_hub_unreachable_without_offline_env_fails_fast(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    hub.hub_reachable.cache_clear()
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="HuggingFaceFW/fineweb"):
        texts(SourceSpec(name="fineweb"))
    assert time.perf_counter() - t0 < 5
    hub.hub_reachable.cache_clear()


def test_chitchat_alternates_user_assistant():
    rows = list(chitchat.iter_conversations(max_items=50))
    assert len(rows) == 50 and chitchat.num_conversations() > 7000
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == [("user", "assistant")[i % 2] for i in range(len(roles))]
        assert all(m["content"].strip() for m in row["messages"])


KEYS = [f"file.jsonl:{i}" for i in range(4000)]


def test_is_heldout_holds_out_about_the_fraction_by_seed_label_and_key():
    held = {k for k in KEYS if is_heldout("src", k, 0, 0.2)}
    # about the fraction (binomial sd over 4000 keys: 0.006)
    assert 0.18 < len(held) / len(KEYS) < 0.22
    assert not any(is_heldout("src", k, 0, 0.0) for k in KEYS) and not any(is_heldout("src", k, 0, -1) for k in KEYS)
    assert all(is_heldout("src", k, 0, 1.0) for k in KEYS)
    # a larger fraction only moves rows from train to validation, never back
    smaller = {k for k in KEYS if is_heldout("src", k, 0, 0.1)}
    assert smaller < held and 0.08 < len(smaller) / len(KEYS) < 0.12
    # another seed, or another source with the same keys, draws a different, independent split:
    # it overlaps this one about as much as chance (0.2 * 0.2 of the keys), not more
    for label, seed in (("src", 1), ("other", 0)):
        other = {k for k in KEYS if is_heldout(label, k, seed, 0.2)}
        assert 0.18 < len(other) / len(KEYS) < 0.22
        assert 0.03 < len(other & held) / len(KEYS) < 0.05


def test_is_heldout_is_the_same_in_every_process():
    """A seeded hash of its inputs, not Python's per-process salted hash(): another process with
    another hash seed holds out exactly the same keys (so every stage, run apart, agrees)."""
    here = [k for k in KEYS[:500] if is_heldout("src", k, 7, 0.3)]
    code = ("import json, sys; from dgpt_core.data.sources import is_heldout; "
            "print(json.dumps([k for k in json.load(sys.stdin) if is_heldout('src', k, 7, 0.3)]))")
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(KEYS[:500]), capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert json.loads(out.stdout) == here


def _routed(path, seed=0, fraction=0.25, **spec):
    cfg = DataConfig(validation_fraction=fraction, seed=seed)
    res = resolve(SourceSpec(name=str(path), **spec))
    return [(sp, c["messages"][0]["content"]) for sp, c in iter_chat_routed(res, cfg, LoadStats())]


def _chat_rows(n, start=0):
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(start, start + n)]


def test_the_routed_split_is_disjoint_seeded_and_stable_when_rows_are_appended(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", _chat_rows(400))
    routed = _routed(path)
    # every valid row lands in exactly one split, about the configured share in validation
    assert sorted(q for _, q in routed) == sorted(f"q{i}" for i in range(400))
    validation = {q for sp, q in routed if sp == "validation"}
    train = {q for sp, q in routed if sp == "train"}
    assert not validation & train and 0.18 < len(validation) / 400 < 0.32
    assert _routed(path) == routed  # the same seed: the same split
    other_seed = {q for sp, q in _routed(path, seed=1) if sp == "validation"}
    assert other_seed != validation and 0.18 < len(other_seed) / 400 < 0.32
    # appending rows (a grown file) keeps every old row where it was; max_items reads a prefix
    write_jsonl(path, _chat_rows(400) + _chat_rows(200, start=400))
    grown = dict((q, sp) for sp, q in _routed(path))
    assert len(grown) == 600 and all(grown[q] == sp for sp, q in routed)
    assert _routed(path, max_items=400) == routed
    # validation_fraction 0: everything trains
    assert {sp for sp, _ in _routed(path, fraction=0.0)} == {"train"}


def test_heldout_split_is_shared_by_the_chat_and_text_views_of_a_source():
    cfg = DataConfig(validation_fraction=0.2)
    res = resolve(SourceSpec(name="chitchat", max_items=200))
    conv_split = {c["row"]: sp for sp, c in iter_chat_routed(res, cfg, LoadStats())}
    assert 0.1 < sum(sp == "validation" for sp in conv_split.values()) / len(conv_split) < 0.3
    # the pretraining text of the same source holds out the same conversations
    text_splits = [sp for sp, _ in iter_text_routed(res, cfg, LoadStats())]
    rows = [c["row"] for c in chitchat.iter_conversations(200)]
    with_assistant = [r for r in rows if r in conv_split]
    assert [text_splits[rows.index(r)] for r in with_assistant] == [conv_split[r] for r in with_assistant]
    # more items of the source leave the first 200 where they were
    more = {c["row"]: sp for sp, c in iter_chat_routed(resolve(SourceSpec(name="chitchat", max_items=400)), cfg,
                                                       LoadStats())}
    assert all(more[r] == sp for r, sp in conv_split.items())
