"""Every import points down the layers: dgpt_core < eval, deploy < tasks, bench < flows, and inside
the library its packages in the order of `LIBRARY_LAYER`.

The walk reads every module's source with ast, so imports inside functions count too; a relative
import is resolved against its module's package.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"dgpt_core": 0, "eval": 1, "deploy": 1, "tasks": 2, "bench": 2, "flows": 3}
"""Layer of each top-level package; a package may import its own layer's peers only if listed here."""
LIBRARY_LAYER = {
    "generation": 0, "cli_errors": 1, "hub": 1, "markdown": 1, "provenance": 1, "config": 2, "models": 3, "data": 4,
    "diffusion": 5, "training": 6, "rlhf": 7, "_cli": 8,
}
"""Layer of each package (and top-level module) of dgpt_core: each imports only from lower layers and
from itself (and `lazy_exports` from the package root); the exported `generation` from nothing else."""
MAX_TOP_LEVEL_MODULES = 8


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, list[str]]]:
    """(line, dotted name as parts) of every import in one module, relative ones resolved; a
    `from X import a, b` gives X.a and X.b (a name may be a module or an attribute of X)."""
    package = list(path.relative_to(ROOT).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (package[: len(package) - node.level + 1] if node.level else []) + [
                part for part in (node.module or "").split(".") if part]
            found += [(node.lineno, base + [alias.name]) for alias in node.names]
    return found


def imported_packages(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, top-level package) of every project import in one module."""
    return [(line, parts[0]) for line, parts in imported_modules(path, source) if parts[0] in LAYER]


def modules() -> list[Path]:
    return sorted(p for name in LAYER for p in (ROOT / name).rglob("*.py"))


def upward_imports(path: Path, source: str | None = None) -> list[str]:
    own = path.relative_to(ROOT).parts[0]
    return [f"{path.relative_to(ROOT)}:{line} imports {top} (layer {LAYER[top]}, not below {own}'s {LAYER[own]})"
            for line, top in imported_packages(path, source)
            if top != own and LAYER[top] >= LAYER[own]]


def test_every_import_points_down():
    assert len(modules()) > 50
    problems = [problem for path in modules() for problem in upward_imports(path)]
    assert not problems, "\n".join(problems)


def test_the_walk_sees_imports_inside_functions_and_relative_ones():
    probe = ROOT / "eval" / "metrics" / "probe.py"
    source = "import torch\nfrom ...deploy import publish\ndef f():\n    from tasks.stages import data_task\n    from . import repetition\n"
    assert imported_packages(probe, source) == [(2, "deploy"), (4, "tasks"), (5, "eval")]
    assert len(upward_imports(probe, source)) == 2  # a peer (deploy) and a higher layer (tasks)
    assert upward_imports(ROOT / "flows" / "probe.py", "from dgpt_core.config import run\nimport bench.cli\n") == []


def library_part(parts: list[str]) -> str | None:
    """The LIBRARY_LAYER entry a dotted dgpt_core name belongs to (None: the package root itself)."""
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LIBRARY_LAYER) else None


def upward_library_imports(path: Path, source: str | None = None) -> list[str]:
    own = library_part(list(path.relative_to(ROOT).with_suffix("").parts))
    problems = []
    for line, parts in imported_modules(path, source):
        if parts[0] != "dgpt_core" or (target := library_part(parts)) in (None, own):
            continue
        if own is None or LIBRARY_LAYER[target] >= LIBRARY_LAYER[own]:
            problems.append(f"{path.relative_to(ROOT)}:{line} imports dgpt_core.{target} (layer "
                            f"{LIBRARY_LAYER.get(target)}, not below {own}'s {LIBRARY_LAYER.get(own)})")
    return problems


def test_every_library_import_points_down_its_packages():
    library = ROOT / "dgpt_core"
    parts = {p.name.removesuffix(".py") for p in library.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert parts == set(LIBRARY_LAYER), "place every package and top-level module of dgpt_core in LIBRARY_LAYER"
    assert len(list(library.glob("*.py"))) <= MAX_TOP_LEVEL_MODULES
    problems = [problem for path in sorted(library.rglob("*.py")) for problem in upward_library_imports(path)]
    assert not problems, "\n".join(problems)


def test_the_library_walk_sees_upward_and_sibling_imports():
    models = ROOT / "dgpt_core" / "models" / "probe.py"
    source = ("from ..config import ModelConfig\nfrom ..training.stage import train_stage\nfrom . import info\n"
              "from .. import lazy_exports\nimport dgpt_core.hub\nfrom dgpt_core.data import world\n")
    problems = upward_library_imports(models, source)
    assert [p.split(":")[1].split()[0] for p in problems] == ["2", "6"]
    assert upward_library_imports(ROOT / "dgpt_core" / "generation" / "probe.py", "from ..hub import is_offline\n")


@pytest.mark.parametrize("layer_package", ["dgpt_core"])
def test_the_library_imports_no_orchestration_or_tracking(layer_package):
    banned = {"prefect", "mlflow"}
    hits = []
    for path in (ROOT / layer_package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            hits += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in banned]
    assert not hits, hits


def test_the_dispatcher_loads_only_the_chosen_commands_layers():
    """`dgpt chat` / `dgpt run --help` build their parsers without Prefect, MLflow or lm-eval."""
    import subprocess
    import sys

    code = ("import sys; from flows.cli import build_parser; build_parser(['chat', 'generate', 'run']); "
            "print(sorted(m for m in ('prefect', 'mlflow', 'lm_eval') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
