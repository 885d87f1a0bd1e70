"""Markdown tables for every report the project writes (data, eval, run report card, model card).

One rule for every cell: a missing value (None) shows as `NONE`; anything else as `fmt(value)`
(`str` unless the caller passes its own number formatting, e.g. `significant`), with `|` escaped
and line breaks turned into spaces so that a cell can never break its row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

NONE = "–"
"""How a missing value (None) shows in every table."""


def significant(value: Any) -> str:
    """Floats with 4 significant digits; None as `NONE`; anything else as str."""
    if value is None:
        return NONE
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(value: Any, fmt: Callable[[Any], str]) -> str:
    text = NONE if value is None else fmt(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    header: Sequence[Any], rows: Iterable[Sequence[Any]], *, fmt: Callable[[Any], str] = str
) -> str:
    """A GitHub-flavoured Markdown table (no trailing newline). `fmt` turns each non-None cell into
    text (default str: numbers as they are; pass `significant` or a formatter of your own);
    None cells show as `NONE`. Header cells are escaped like the others."""
    lines = ["| " + " | ".join(_cell(h, str) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c, fmt) for c in row) + " |" for row in rows]
    return "\n".join(lines)
