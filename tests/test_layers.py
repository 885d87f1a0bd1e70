"""Every import points down the layers: dgpt_core < eval, deploy < tasks, bench < flows.

The walk reads every module's source with ast, so imports inside functions count too; a relative
import is resolved against its module's package.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"dgpt_core": 0, "eval": 1, "deploy": 1, "tasks": 2, "bench": 2, "flows": 3}
"""Layer of each top-level package; a package may import its own layer's peers only if listed here."""


def imported_packages(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, top-level package) of every project import in one module, relative ones resolved."""
    package = list(path.relative_to(ROOT).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                full = package[: len(package) - node.level + 1] + (node.module or "").split(".")
                found.append((node.lineno, full[0]))
            elif node.module:
                found.append((node.lineno, node.module.split(".")[0]))
    return [(line, top) for line, top in found if top in LAYER]


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
    assert upward_imports(ROOT / "flows" / "probe.py", "from dgpt_core import run_config\nimport bench.cli\n") == []


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
