"""diffusionGPT's engine: masked discrete diffusion language models on a ModernBERT backbone.

A plain library (no orchestration or tracking imports): tokenizer, model, schedules, collator,
loss, trainer, sampling and the `text-diffusion` pipeline, each usable from a notebook.
"""

__version__ = "0.1.0"
