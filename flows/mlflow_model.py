"""The saved `text-diffusion` folder as an MLflow pyfunc model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc


class TextDiffusionModel(mlflow.pyfunc.PythonModel):
    """predict(["prompt", ...] or a DataFrame with a `prompt` column) -> generated texts."""

    def load_context(self, context: Any) -> None:
        from transformers import pipeline

        self.pipe = pipeline("text-diffusion", model=context.artifacts["model_dir"], trust_remote_code=True)

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        outputs = self.pipe([[{"role": "user", "content": p}] for p in prompts], **(params or {}))
        return [out[0]["generated_text"] if isinstance(out, list) else out["generated_text"] for out in outputs]


def pip_requirements() -> list[str]:
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}", "safetensors"]


def log_pyfunc_model(model_dir: Path) -> Any:
    """Log `model_dir` (weights, tokenizer, pipeline code) as the artifact of a pyfunc model."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=TextDiffusionModel(),
        artifacts={"model_dir": str(model_dir)},
        pip_requirements=pip_requirements(),
    )
