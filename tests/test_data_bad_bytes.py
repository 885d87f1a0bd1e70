"""Bytes that are not UTF-8 in local files: one invalid row (file, line or row, field), never a crash."""

from __future__ import annotations

import json
import random
import re

import pytest

from dgpt_core.config import DataConfig, SourceSpec
from dgpt_core.data.sources import (
    DataValidationError,
    LoadStats,
    iter_chat_routed,
    iter_text_routed,
    raise_on_errors,
    resolve,
)

CFG = DataConfig(validation_fraction=0.0)
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
# the assistant's answer holds a Latin-1 "é" (0xe9), which is not UTF-8
BAD_LINE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "caf\xe9"}]}\n'
BAD_COLUMN = BAD_LINE.index(b"\xe9") + 1


def chats(spec: SourceSpec):
    res, stats = resolve(spec), LoadStats()
    return res, stats, [c for _, c in iter_chat_routed(res, CFG, stats)]


def texts(spec: SourceSpec):
    res, stats = resolve(spec), LoadStats()
    return res, stats, [t for _, t in iter_text_routed(res, CFG, stats)]


def bad_jsonl(path):
    good = (json.dumps(GOOD) + "\n").encode()
    path.write_bytes(good + BAD_LINE + good)
    return path


def test_an_undecodable_jsonl_row_is_dropped_and_counted_as_invalid_utf8(tmp_path):
    path = bad_jsonl(tmp_path / "chats.jsonl")
    _, stats, out = chats(SourceSpec(name=str(path), on_invalid="drop"))
    assert len(out) == 2 and stats.rows == 3 and stats.kept == 2
    [f] = stats.failures
    assert (f.file, f.row, f.line, f.field, f.code) == (str(path), 2, 2, "messages[1].content", "invalid_utf8")
    assert f.reason == f"not valid UTF-8 (byte 0xe9 at column {BAD_COLUMN})"
    assert stats.summary() == f"{path}: 3 read, 1 dropped (invalid_utf8: 1)"
    # the pretraining view of the same file drops and counts the same row
    _, stats, docs = texts(SourceSpec(name=str(path), on_invalid="drop"))
    assert len(docs) == 2 and [f.code for f in stats.failures] == ["invalid_utf8"]


def test_an_undecodable_jsonl_row_fails_a_strict_source_with_one_line_naming_file_line_and_field(tmp_path):
    path = bad_jsonl(tmp_path / "chats.jsonl")
    res, stats, _ = chats(SourceSpec(name=str(path)))
    with pytest.raises(DataValidationError) as err:
        raise_on_errors(res, stats)
    assert str(err.value) == (f"{path}: line 2: field 'messages[1].content': not valid UTF-8 (byte 0xe9 at column "
                              f"{BAD_COLUMN}); set on_invalid: drop to skip and count invalid rows")
    # a line that is neither UTF-8 nor JSON is still an undecodable row, not a crash
    path.write_bytes(b"{\xff\n" + BAD_LINE)
    res, stats, _ = chats(SourceSpec(name=str(path)))
    with pytest.raises(DataValidationError) as err:
        raise_on_errors(res, stats)
    first, *rest = str(err.value).splitlines()
    assert first == (f"{path}: line 1: not valid UTF-8 (byte 0xff at column 2); 2 invalid rows in this source "
                     "(invalid_utf8: 2); set on_invalid: drop to skip and count them")
    assert rest == [f"  {path}: line 2: field 'messages[1].content': not valid UTF-8 (byte 0xe9 at column {BAD_COLUMN})"]


@pytest.mark.parametrize(("unit", "docs", "row", "line"), [
    ("paragraph", ["one\ntwo", "four\n"], 1, 4),
    ("line", ["one", "two", "four"], 4, 4),
    ("file", [], 0, 4),
])
def test_an_undecodable_text_document_is_dropped_naming_its_line(tmp_path, unit, docs, row, line):
    path = tmp_path / "a.txt"
    path.write_bytes(b"one\ntwo\n\n\tx\xe9\n\nfour\n")  # the bad byte is line 4, column 3
    _, stats, got = texts(SourceSpec(name=str(path), txt_unit=unit, on_invalid="drop"))
    bad = [f for f in stats.failures if f.code == "invalid_utf8"]
    assert got == docs and len(bad) == 1
    assert (bad[0].row, bad[0].line, bad[0].field) == (row, line, "<row>")
    assert bad[0].reason == "not valid UTF-8 (byte 0xe9 at column 3)"


def test_undecodable_values_in_json_parquet_and_disk_sources_name_row_and_field(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"fine", b"caf\xe9 au lait", b"also fine"], pa.binary())
    unchecked = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # Arrow strings nobody validated
    table = pa.table({"id": [0, 1, 2], "text": unchecked})
    pq.write_table(table, tmp_path / "t.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "t.json").write_bytes(b'[{"text": "fine"}, {"text": "caf\xe9 au lait"}, {"text": "also fine"}]')
    for name in ("t.parquet", "disk", "t.json"):
        path = str(tmp_path / name)
        _, stats, docs = texts(SourceSpec(name=path, on_invalid="drop"))
        assert docs == ["fine", "also fine"], name
        [f] = stats.failures
        assert (f.file, f.row, f.line, f.field, f.code) == (path, 1, None, "text", "invalid_utf8"), name
        assert f.describe() == f"{path}: row 1: field 'text': not valid UTF-8 (byte 0xe9 at character 4)"


def test_the_summary_names_every_file_with_rows_read_and_dropped_per_reason(tmp_path):
    with bad_jsonl(tmp_path / "a1.jsonl").open("ab") as fh:
        fh.write(b'{"conversation": []}\n{"messages": []}\n')
    (tmp_path / "a2.jsonl").write_text("")
    _, stats, out = chats(SourceSpec(name=str(tmp_path / "a*.jsonl"), on_invalid="drop"))
    assert len(out) == 2
    assert stats.summary() == (f"{tmp_path / 'a1.jsonl'}: 5 read, 3 dropped (missing_messages: 2, invalid_utf8: 1); "
                               f"{tmp_path / 'a2.jsonl'}: 0 read")


def test_streamed_paragraphs_cut_text_exactly_as_the_blank_line_split_of_the_whole_file():
    from dgpt_core.data.local_files import paragraphs

    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(["a", "b ", " ", "\n", "\n", "\x0c"]) for _ in range(rng.randrange(12)))
        lines = re.findall(r"[^\n]*\n|[^\n]+", text)  # as a text file iterates: only "\n" ends a line
        got = list(paragraphs(lines))
        assert [doc for _, doc in got] == re.split(r"\n\s*\n", text), repr(text)
        for first, doc in got[:-1]:  # each paragraph's first line is where its text starts
            assert "".join(lines[first - 1:]).startswith(doc), repr(text)
