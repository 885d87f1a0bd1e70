"""Decoding: noise schedules, block attention with its KV cache, the sampler loop, its tensor ops
and options, and the `text-diffusion` transformers pipeline.

These modules import only torch, transformers and each other (single-dot imports), because they
are copied flat beside the weights of every exported model folder and run there without the
project (`models.export.PIPELINE_FILES`). Training imports the schedules and the block attention
from here, so a model is trained and decoded by the same code.
"""

from .. import lazy_exports

_EXPORTS = {
    "NoiseSchedule": "schedules", "get_schedule": "schedules", "sample_t": "schedules",
    "PrefixCache": "attention", "encode": "attention",
    "DEFAULTS_KEY": "options", "MODIFIERS": "options", "STRATEGIES": "options", "SampleResult": "options",
    "SamplerConfig": "options", "SamplerState": "options", "Strategy": "options", "TokenIds": "options",
    "method_options": "options",
    "cut_at_stop": "sampler", "generate": "sampler", "left_pad": "sampler", "stream": "sampler",
    "TASK": "pipeline", "TextDiffusionPipeline": "pipeline",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
