"""diffusionGPT's engine: masked discrete diffusion language models on a ModernBERT backbone.

A plain library (no orchestration or tracking imports), in packages by role, lowest first (a
package imports only from the ones before it; `tests/test_layers.py` holds it to that):

- `generation`: noise schedules, block attention with its KV cache, the sampler and the
  `text-diffusion` pipeline (torch and transformers only: copied into every exported model folder);
- `config`: the typed configs and their YAML presets;
- `models`: the ModernBERT backbone, the tokenizer, what a model folder is, and its export;
- `data`: sources, the synthetic world and skills, tokenizer training, packing, SFT examples;
- `diffusion`: the training objective (collator, loss, ELBO);
- `training`: one stage as a function, the trainer, process launching, DeepSpeed configs;
- `_cli`: the `dgpt` sub-commands that need nothing above the library.

Beside them, modules every package may use: `cli_errors`, `hub`, `markdown`, `provenance`.
Each package names its public pieces in its `__init__` and imports them on first use, so
importing one (the configs, say) never loads the others' dependencies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__version__ = "0.1.0"


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` of a package whose public names (`exports`: name -> module of the
    package defining it) are imported from their module on first access (PEP 562)."""

    def getattr_(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return getattr_, lambda: sorted(exports)
