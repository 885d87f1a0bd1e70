"""The README's layout table names every package of the library, and every module it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `(dgpt_core/[\w/]*)` \| (.*) \|$")


def layout_rows() -> dict[str, str]:
    return {m.group(1): m.group(2) for line in (ROOT / "README.md").read_text().splitlines() if (m := ROW.match(line))}


def test_the_layout_table_lists_every_library_package():
    rows = layout_rows()
    packages = {f"dgpt_core/{p.parent.name}/" for p in (ROOT / "dgpt_core").glob("*/__init__.py")}
    listed = {path for path in rows if path.count("/") == 2}
    assert listed == packages


def test_every_module_the_layout_table_names_exists():
    missing = []
    for path, text in layout_rows().items():
        folder = ROOT / path
        assert folder.is_dir(), path
        for name in re.findall(r"`([a-z_]+)/?`", text):
            if not any((folder / f"{name}{suffix}").exists() for suffix in (".py", ".yaml", "")):
                missing.append(f"{path}{name}")
    assert not missing, missing
