"""Data reports: the same content as Markdown (for people) and JSON (for tools)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..markdown import markdown_table


def _fmt(value: Any) -> str:
    """Numbers with thousands separators (floats to 4 significant digits)."""
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """One table of dict rows (columns: every key, in first-seen order; a missing key is empty)."""
    if not rows:
        return ["(none)", ""]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return [markdown_table(cols, [[r.get(c, "") for c in cols] for r in rows], fmt=_fmt), ""]


def render_markdown(report: dict[str, Any]) -> str:
    """Keys: title, summary (dict), tables ({title: rows}), failures (rows), examples
    ([{title, text}])."""
    lines = [f"# {report.get('title', 'Data report')}", ""]
    summary = report.get("summary", {})
    if summary:
        lines += _table([{"item": k, "value": v} for k, v in summary.items()])
    for title, rows in report.get("tables", {}).items():
        lines += [f"## {title}", "", *_table(rows)]
    failures = report.get("failures")
    if failures is not None:
        total = report.get("failure_count", len(failures))
        lines += [f"## Validation failures ({total})", ""]
        lines += _table(failures) if failures else ["none", ""]
        if total > len(failures):
            lines += [f"... {total - len(failures)} more (first {len(failures)} shown)", ""]
    for ex in report.get("examples", []):
        lines += [f"### {ex['title']}", "", "```text", ex["text"], "```", ""]
    return "\n".join(lines)


def write_report(folder: str | Path, report: dict[str, Any], name: str = "report") -> tuple[Path, Path]:
    """Write `<name>.md` and `<name>.json` into the folder."""
    folder = Path(folder)
    md = folder / f"{name}.md"
    js = folder / f"{name}.json"
    md.write_text(render_markdown(report))
    js.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return md, js
