"""The GPT-2 baseline on a run's report card.

`dgpt bench --suite baseline` on a model folder leaves its short-answer comparison beside the
weights (`BASELINE_FILE`) and refreshes the report card of the run the folder belongs to (a
`<run>/models/<name>` path); the flow's card shows the same section whenever the file is there,
so a cached rerun keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dgpt_core.markdown import markdown_table, significant

BASELINE_FILE = "baseline_comparison.json"
SECTION = "## Against the GPT-2 baseline (dgpt bench)"
SHORT_ANSWERS = {
    "heldout_exact_match": "held-out people: attribute exact match",
    "reversal_exact_match": "reversed questions: exact match",
    "exact_match": "skills test items: exact match",
}
"""The short-answer figures of the baseline suite the card shows, with their labels."""


def comparison(baseline: dict[str, Any], command: str) -> dict[str, Any]:
    """What the card needs from a `baseline` suite result: both models' short-answer figures, our
    decoding method, the AR model's size and training, and the command that measured them."""
    keys = [k for k in SHORT_ANSWERS if k in baseline["ours"] and k in baseline["ar"]]
    return {"figures": {k: {"ours": baseline["ours"][k], "ar": baseline["ar"][k]} for k in keys},
            "method": baseline["ours"].get("method", ""), "ar_parameters": baseline["ar"].get("parameters"),
            "ar_steps": {stage: info["steps"] for stage, info in baseline["ar"].get("training", {}).get("stages", {}).items()},
            "command": command}


def write_comparison(model_dir: str | Path, comp: dict[str, Any]) -> Path:
    path = Path(model_dir) / BASELINE_FILE
    path.write_text(json.dumps(comp, indent=2))
    return path


def read_comparison(model_dir: str | Path | None) -> dict[str, Any] | None:
    path = Path(model_dir) / BASELINE_FILE if model_dir else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def card_section(comp: dict[str, Any]) -> list[str]:
    """The card's section: ours (our method) beside the GPT-2 baseline on the same items."""
    rows = [[SHORT_ANSWERS[k], v["ours"], v["ar"], v["ours"] - v["ar"]] for k, v in comp["figures"].items()]
    steps = ", ".join(f"{stage} {n} steps" for stage, n in comp["ar_steps"].items())
    return [SECTION, "",
            f"The parameter-matched GPT-2 ({comp['ar_parameters']} parameters; {steps}), trained on this run's data "
            f"and decoded greedily with its KV cache, beside ours decoded with {comp['method']}, on the same items. "
            f"Measured by `{comp['command']}`.", "",
            markdown_table(["metric", "ours", "GPT-2", "ours - GPT-2"], rows, fmt=significant), ""]


def run_card_of(model_dir: str | Path) -> Path | None:
    """The report card of the run whose `models/<name>` link `model_dir` is, if it is one."""
    path = Path(model_dir)
    card = path.parent.parent / "report_card.md"
    return card if path.parent.name == "models" and card.is_file() else None


def refresh_card(card: Path, section: list[str]) -> None:
    """Put `section` on `card`: in place of an earlier one, else before its stages table."""
    lines = card.read_text().split("\n")
    if SECTION in lines:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        del lines[start:end]
    else:
        start = lines.index("## Stages") if "## Stages" in lines else len(lines)
    lines[start:start] = section
    card.write_text("\n".join(lines))
