"""The one Markdown table helper (None, escaping, number formatting) and the provenance helpers."""

from __future__ import annotations

from dgpt_core.markdown import NONE, markdown_table, significant
from dgpt_core.provenance import commit_label, git_state, library_versions


def test_table_cells_none_escaping_and_formatting():
    table = markdown_table(["name", "value"], [["a|b", None], ["two\nlines", 0.123456], ["n", 3]])
    assert table.splitlines() == [
        "| name | value |",
        "|---|---|",
        f"| a\\|b | {NONE} |",
        "| two lines | 0.123456 |",
        "| n | 3 |",
    ]
    assert markdown_table(["x"], [[0.123456], [None], [True]], fmt=significant).splitlines()[2:] == [
        "| 0.1235 |", f"| {NONE} |", "| True |"]
    assert markdown_table(["x"], [[1234.5]], fmt=lambda v: f"{v:,.1f}").endswith("| 1,234.5 |")
    assert markdown_table(["x"], []) == "| x |\n|---|"


def test_git_state_and_versions(tmp_path):
    state = git_state()
    assert set(state) == {"git.commit", "git.dirty"} and state["git.dirty"] in {"true", "false", "unknown"}
    assert git_state(tmp_path)["git.commit"] == "unknown"  # not a checkout
    assert commit_label({"git.commit": "abc", "git.dirty": "true"}) == "abc-dirty"
    assert commit_label({"git.commit": "abc", "git.dirty": "false"}) == "abc"
    versions = library_versions()
    assert "python" in versions and "torch" in versions
    assert library_versions(["surely-not-installed-pkg"]).keys() == {"python"}
