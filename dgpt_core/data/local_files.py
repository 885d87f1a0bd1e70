"""Local data files: which files a source names, and their rows, read a line, a paragraph or a
batch at a time.

.jsonl and .txt files stream (one line or paragraph in memory), .parquet files and `save_to_disk`
folders go batch by batch, a .json file is one document. Bytes that are not UTF-8 never stop a
file: their row becomes a `BadRow` saying which byte, where, and (for structured rows) in which
field, so the caller drops or reports it like any other invalid row.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# with errors="surrogateescape" every undecodable byte 0xXY reads as the lone surrogate U+DCXY
_UNDECODED = re.compile("[\udc80-\udcff]")
_BATCH = 1000


def is_local(name: str) -> bool:
    """Whether a source name is a local path (rather than a registry name or Hub dataset id)."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.endswith(LOCAL_SUFFIXES)
        or any(ch in name for ch in "*?[")
        or Path(name).exists()
    )


def local_paths(name: str) -> list[str]:
    """The files a local source names (a file, a glob, or one `save_to_disk` folder)."""
    path = os.path.expanduser(name)
    if Path(path).is_dir():
        return [path]
    files = sorted(glob.glob(path)) if any(ch in path for ch in "*?[") else [path]
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise FileNotFoundError(f"data source {name!r}: no such file {missing or path}")
    return files


@dataclass(frozen=True)
class BadRow:
    """A row that could not be read; `code` is the reason it is counted under."""

    code: str
    reason: str
    field: str = "<row>"


def _first_undecoded(text: str) -> int | None:
    found = _UNDECODED.search(text)
    return found.start() if found else None


def _utf8_reason(undecoded: str, where: str) -> str:
    """The reason for an undecodable byte, given as the surrogate it was read as."""
    return f"not valid UTF-8 (byte 0x{ord(undecoded) - 0xDC00:02x} at {where})"


def _undecoded_field(value: Any, path: str = "") -> tuple[str, str, int] | None:
    """(field path, string, position) of the first string value of a parsed row holding an undecodable byte."""
    if isinstance(value, str):
        pos = _first_undecoded(value)
        return None if pos is None else (path or "<row>", value, pos)
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for sub, v in items if (found := _undecoded_field(v, sub))), None)


def _open_text(path: str):
    return open(path, encoding="utf-8", errors="surrogateescape")


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                row = BadRow("invalid_json", f"invalid JSON: {err.msg}")
            bad = _first_undecoded(line)
            if bad is not None:
                found = None if isinstance(row, BadRow) else _undecoded_field(row)
                row = BadRow("invalid_utf8", _utf8_reason(line[bad], f"column {bad + 1}"), found[0] if found else "<row>")
            yield lineno, row


def paragraphs(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(first line number, paragraph) of "\\n"-terminated lines, cut exactly as
    `re.split(r"\\n\\s*\\n", "".join(lines))` cuts them, with one paragraph in memory at a time."""
    piece: list[str] = []
    start, between, lineno = 1, False, 0
    for lineno, line in enumerate(lines, start=1):
        if line.endswith("\n") and not line.strip():  # a blank line
            if between:
                continue
            if piece:
                yield start, "".join(piece)[:-1]
                piece, between = [], True
                continue
        elif between:
            between = False
        if not piece:
            start = lineno
        piece.append(line)
    yield (start if piece else lineno + 1), "".join(piece)


def _txt_docs(path: str, unit: str) -> Iterator[tuple[int, str]]:
    """(first line number, document) of a text file cut into paragraphs, lines or the whole file."""
    with _open_text(path) as fh:
        if unit == "file":
            yield 1, fh.read()
        elif unit == "line":
            for lineno, line in enumerate(fh, start=1):
                for part in line.splitlines():
                    yield lineno, part
        else:
            yield from paragraphs(fh)


def _txt_rows(path: str, unit: str) -> Iterator[tuple[int, int, Any]]:
    offset = 1 if unit == "line" else 0
    for i, (first, doc) in enumerate(_txt_docs(path, unit)):
        bad = _first_undecoded(doc)
        if bad is None:
            yield i + offset, first, {"text": doc}
            continue
        line_start = doc.rfind("\n", 0, bad) + 1
        where = f"column {bad - line_start + 1}"
        yield i + offset, first + doc.count("\n", 0, bad), BadRow("invalid_utf8", _utf8_reason(doc[bad], where))


def _json_rows(path: str) -> Iterator[tuple[int, Any]]:
    text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from None
    rows = data if isinstance(data, list) else data.get("data", data.get("rows", [data]))
    check = _first_undecoded(text) is not None
    for i, row in enumerate(rows):
        found = _undecoded_field(row) if check else None
        if found:
            fld, value, pos = found
            row = BadRow("invalid_utf8", _utf8_reason(value[pos], f"character {pos + 1}"), fld)
        yield i, row


def _rows_or_bad(n: int, all_rows: Callable[[], list], cell: Callable[[int, str], Any], columns: list[str]) -> list:
    """The n rows of one Arrow batch; when one of them holds bytes that are not UTF-8, it becomes a
    BadRow naming its column (and the others are read one by one)."""
    try:
        return all_rows()
    except UnicodeDecodeError:
        pass
    out: list = []
    for j in range(n):
        row: Any = {}
        for col in columns:
            try:
                row[col] = cell(j, col)
            except UnicodeDecodeError as err:
                text = err.object.decode("utf-8", "surrogateescape")
                pos = len(err.object[: err.start].decode("utf-8"))
                row = BadRow("invalid_utf8", _utf8_reason(text[pos], f"character {pos + 1}"), col)
                break
        out.append(row)
    return out


def _batch_cell(batch, j: int, col: str) -> Any:
    return batch.column(col)[j].as_py()


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in _rows_or_bad(batch.num_rows, batch.to_pylist, partial(_batch_cell, batch), batch.schema.names):
            yield i, row
            i += 1


def _dataset_slice(ds, start: int, stop: int) -> list[dict]:
    cols = ds[start:stop]
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


def _dataset_cell(ds, start: int, j: int, col: str) -> Any:
    return ds.select_columns([col])[start + j][col]


def _disk_rows(path: str, split: str) -> Iterator[tuple[int, Any]]:
    import datasets

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    datasets.disable_progress_bars()
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r} (has {list(ds)})")
        ds = ds[split]
    for start in range(0, len(ds), _BATCH):
        stop = min(start + _BATCH, len(ds))
        rows = _rows_or_bad(stop - start, partial(_dataset_slice, ds, start, stop), partial(_dataset_cell, ds, start),
                            ds.column_names)
        yield from enumerate(rows, start)


def local_rows(files: list[str], split: str, txt_unit: str) -> Iterator[tuple[str, int, int | None, Any]]:
    """(file, row, line, row data) for every row of every local file. `row` is the 1-based line
    number for .jsonl and .txt lines and the 0-based index otherwise; `line` is the line the row
    starts on (.jsonl, .txt) or None; row data is a dict, or a BadRow for a row that could not be read."""
    for path in files:
        if Path(path).is_dir():
            rows: Iterator = ((i, None, r) for i, r in _disk_rows(path, split))
        elif path.endswith(".jsonl"):
            rows = ((i, i, r) for i, r in _jsonl_rows(path))
        elif path.endswith(".json"):
            rows = ((i, None, r) for i, r in _json_rows(path))
        elif path.endswith(".parquet"):
            rows = ((i, None, r) for i, r in _parquet_rows(path))
        else:
            rows = _txt_rows(path, txt_unit)
        for row, line, data in rows:
            yield path, row, line, data
